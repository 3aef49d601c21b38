"""`python -m pipelines.serve`: deploy (or roll over to) the models on Ray Serve, report on them, stop them.

    python -m pipelines.serve [--model URI|PATH]   # start or join Ray, deploy quill, print the endpoint, return
        [--chat-model URI|PATH]                     # the chat model beside it (default: its champion, if any)
    python -m pipelines.serve status                # what is deployed; exit 0 when healthy
    python -m pipelines.serve shutdown              # delete the app; stop Ray too if this command started it
    python -m pipelines.serve config [--model ...]  # a Serve config file for `serve deploy` / a KubeRay RayService

Without RAY_ADDRESS a detached local Ray (`ray start --head` on loopback, on its default ports where they are
free) is started on first use and recorded in the project's .quill/serve-ray.json; later commands in the project
join that one (never some other Ray found on the machine, nor another checkout's), and `shutdown` stops exactly its
processes (never `ray stop`, which stops every Ray of the user).
Set RAY_ADDRESS (an address, or `auto` for the latest `ray start` here) to use a cluster of your own.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import ray
import yaml
from ray import serve
from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
from ray._raylet import AuthenticationTokenLoader, Config

from pipelines.common.contracts import CHAMPION
from pipelines.common.params import ParamsError, ServeParams, load_params
from pipelines.common.tracking import tracking_uri
from pipelines.serve import APP_NAME, HIGH_THROUGHPUT_ENV, build, port_or_free, ray_start_env

REPO = Path(__file__).resolve().parents[2]
# present while a Ray this project's CLI started runs: the project's own, so that another checkout (or another user,
# who could plant a record in a shared temp dir) never joins this Ray or stops it
STATE = Path(".quill") / "serve-ray.json"
TOKEN = Path(".quill") / "ray-auth-token"  # that Ray's token (owner-only): no other local user can submit work to it
RAY = Path(sys.executable).parent / "ray"


def connect() -> bool:
    """Join RAY_ADDRESS, else the local Ray this command started; False if there is none."""
    local = _local_ray()
    address = os.environ.get("RAY_ADDRESS") or local.get("address")
    if not address:
        return False
    if not os.environ.get("RAY_ADDRESS") and local.get("token_path"):
        use_token(local["token_path"], os.environ)
        # Ray reads the auth mode and token once per process (its config may be read already): read them again
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    elif not os.environ.get("RAY_ADDRESS") and local["auth_mode"] == "token":
        # Ray sends its token to an explicit address only when told to (for "auto" it decides itself)
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        return True
    except ConnectionError:
        return False


def _local_ray() -> dict:
    """STATE of the local Ray this command started, {} when there is none (a stale record is removed)."""
    if not STATE.exists():
        return {}
    try:
        state = json.loads(STATE.read_text())
        host, port = state["address"].rsplit(":", 1)
        with socket.socket() as s:
            s.settimeout(2)
            if s.connect_ex((host, int(port))) == 0 and {"pgid", "auth_mode"} <= set(state):
                return state
    except (ValueError, KeyError, AttributeError):  # unreadable, or an older command's record
        pass
    STATE.unlink(missing_ok=True)  # its GCS is gone (killed, or the machine restarted)
    return {}


def use_token(path: str, env: dict) -> dict:
    """env set to authenticate with the token in `path` (Ray reads RAY_AUTH_TOKEN before the path: dropped)."""
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=path)
    return env


def new_token() -> str:
    """A fresh token for the Ray this command starts, in TOKEN (readable by this user only); its absolute path."""
    TOKEN.parent.mkdir(exist_ok=True)
    TOKEN.unlink(missing_ok=True)
    fd = os.open(TOKEN, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return str(TOKEN.resolve())


def logical_cpus(p: ServeParams) -> int:
    """The CPUs the local Ray schedules: the machine's, or more when quill's deployments need them. Ray's CPUs are
    scheduling tokens; a rolling update (serve.max_surge_percent) starts a model's replacements before it stops the
    replicas they replace, so both models' replicas and one model's replacements must fit at once, or the update
    waits for a CPU forever (two models on a 2-core machine)."""
    replicas = p.max_replicas or p.num_replicas
    need = math.ceil(p.num_cpus_per_replica * replicas * (2 + p.max_surge_percent / 100))
    return max(os.cpu_count() or 1, need)


def start_local_ray(p: ServeParams) -> dict:
    """A detached head node on loopback that outlives this command, in its own process group (see stop_local_ray);
    the replicas import quill from this checkout; Ray Serve's high-throughput mode when serve.high_throughput.
    Token auth always: without it any local user could submit a job on the dashboard port and run code as this
    one; later commands send the token from TOKEN."""
    token_path = new_token()
    mode = ray_start_env(p)
    env = use_token(
        token_path,
        {**mode, **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
    )
    gcs, dashboard, metrics = port_or_free(6379), port_or_free(8265), port_or_free(8080)
    cmd = [
        str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--metrics-export-port", str(metrics),
        "--ray-client-server-port", str(port_or_free(10001)), "--dashboard-agent-listen-port", str(port_or_free(52365)),
        "--disable-usage-stats", "--num-cpus", str(logical_cpus(p)),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    out, _ = proc.communicate()
    if proc.returncode != 0:
        stop_local_ray(proc.pid)
        raise RuntimeError(f"ray start failed: {out.strip().splitlines()[-1] if out.strip() else proc.returncode}")
    state = {
        "started_by": "pipelines.serve",
        "cwd": str(Path.cwd()),
        "address": f"127.0.0.1:{gcs}",
        "pgid": proc.pid,
        "auth_mode": "token",
        "token_path": token_path,  # `ray start` led the group its daemons (GCS, raylet, dashboard) run in
        "dashboard": f"http://127.0.0.1:{dashboard}",
        "metrics": f"http://127.0.0.1:{metrics}/metrics",
        "high_throughput": mode.get("RAY_SERVE_ENABLE_HA_PROXY") == "1",
    }
    if state["high_throughput"]:
        state["haproxy_stats"] = f"http://127.0.0.1:{mode['RAY_SERVE_HAPROXY_STATS_PORT']}/stats"
    STATE.parent.mkdir(exist_ok=True)
    STATE.write_text(json.dumps(state))
    return state


def stop_local_ray(pgid: int, timeout: float = 5) -> None:
    """Stop the Ray processes of one `ray start`: its process group and their descendants (workers and actors
    lead groups of their own), by pid: SIGTERM, then SIGKILL what is left after `timeout` seconds (Ray's daemons
    linger for a while on SIGTERM; the app is gone by then)."""
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if os.getpgid(p.pid) == pgid and "ray" in " ".join(p.info["cmdline"] or []):
                procs[p.pid] = p
                procs.update((c.pid, c) for c in p.children(recursive=True))
        except (psutil.Error, ProcessLookupError):
            pass
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def deploy(model: str | None, chat_model: str | None = None) -> int:
    params = load_params()
    p = params.serve
    application = build(params, model, tracking_uri(), chat_model=chat_model)  # a bad model fails before Ray starts
    local = _local_ray()
    if local and not os.environ.get("RAY_ADDRESS") and local.get("high_throughput") != p.high_throughput:
        print(
            f"serve: note: the local Ray was started with serve.high_throughput: {local.get('high_throughput')}, "
            "which only a new Ray changes: python -m pipelines.serve shutdown, then deploy again",
            flush=True,
        )
    if not connect():
        if os.environ.get("RAY_ADDRESS"):
            print(f"serve: error: no Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}", file=sys.stderr)
            return 1
        mode = ", Ray Serve's high-throughput mode (HAProxy ingress)" if p.high_throughput else ""
        print(f"serve: starting a local Ray instance (ray start --head{mode})", flush=True)
        local = start_local_ray(p)
        print(
            f"serve: Ray dashboard {local['dashboard']} (token auth: the token is in {TOKEN}), "
            f"Prometheus metrics {local['metrics']}",
            flush=True,
        )
        if local.get("haproxy_stats"):  # Ray's HAProxy template binds these on every interface
            print(f"serve: HAProxy stats {local['haproxy_stats']} (read-only, on every interface)", flush=True)
        if not connect():
            raise RuntimeError(f"cannot join the local Ray just started at {local['address']}")
    serve.start(http_options={"host": p.host, "port": p.port})
    running = APP_NAME in serve.status().applications
    print(
        f"serve: {'rolling update of' if running else 'deploying'} {model or p.model or 'the champions'} ...",
        flush=True,
    )
    if p.compile:
        print("serve: serve.compile is on: each replica compiles before it takes requests (a minute or more on CPU)")
    serve.run(application, name=APP_NAME, route_prefix="/")
    base, *chat = _models(p)
    url = f"http://{p.host}:{p.port}"
    print(f"serve: {base['id']} (version {base['version']}, {base['uri']}) at {url}/v1")
    for card in chat:
        print(f"serve: {card['id']} (version {card['version']}, {card['uri']}) for /v1/chat/completions")
    print(
        f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
        f"""-d '{{"prompt": "To be, or", "max_tokens": 32}}'"""
    )
    print(
        f"  OpenAPI: {url}/docs   status: python -m pipelines.serve status   stop: python -m pipelines.serve shutdown"
    )
    return 0


def status() -> int:
    params = load_params()
    if not connect():
        print("serve: not running (no Ray instance)")
        return 1
    apps = serve.status().applications
    if APP_NAME not in apps:
        print("serve: Ray is up but quill is not deployed")
        return 1
    state = str(getattr(apps[APP_NAME].status, "value", apps[APP_NAME].status))
    try:
        cards = _models(params.serve)
    except (httpx.HTTPError, KeyError) as exc:
        print(f"serve: {state}, endpoint not answering ({exc})")
        return 1
    p = params.serve
    served = ", ".join(f"{card['id']} version {card['version']} ({card['uri']})" for card in cards)
    print(f"serve: {state}: {served} at http://{p.host}:{p.port}/v1")
    return 0 if state == "RUNNING" else 1


def shutdown() -> int:
    if connect():
        if APP_NAME in serve.status().applications:
            serve.delete(APP_NAME)
            print("serve: quill deleted")
        if not serve.status().applications:
            serve.shutdown()
        ray.shutdown()
    local = _local_ray()
    if local:  # only a Ray this command started is stopped
        stop_local_ray(local["pgid"])
        STATE.unlink()
        TOKEN.unlink(missing_ok=True)
        print("serve: local Ray stopped")
    return 0


def config(model: str | None, chat_model: str | None = None) -> int:
    """A Serve config for `serve deploy` (or a RayService's serveConfigV2), pinned like a deploy would be."""
    params = load_params()
    p = params.serve
    args = {
        "model": model or p.model or f"models:/{params.registry.model_name}@{CHAMPION}",
        "chat_model": chat_model or p.chat_model,  # None: the chat model's champion when it has one
        "tracking_uri": tracking_uri(),
    }
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": p.host, "port": p.port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "pipelines.serve:app", "args": args}],
    }
    if p.high_throughput:  # not a field of the config: Ray's processes read it when they start
        env = " ".join(f"{k}={v}" for k, v in HIGH_THROUGHPUT_ENV.items())
        print(f"# serve.high_throughput: start Ray's processes with {env} (a RayService: its containers' env)")
    print(yaml.safe_dump(doc, sort_keys=False), end="")
    return 0


def _models(p: ServeParams) -> list[dict]:
    """The served models' cards, the base model's first."""
    headers = {"Authorization": f"Bearer {os.environ['QUILL_API_KEY']}"} if os.environ.get("QUILL_API_KEY") else {}
    r = httpx.get(f"http://{p.host}:{p.port}/v1/models", headers=headers, timeout=10)
    r.raise_for_status()
    return r.json()["data"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="deploy", choices=["deploy", "status", "shutdown", "config"])
    parser.add_argument("--model", help="registry URI (models:/name@alias, models:/name/3) or a local model folder")
    parser.add_argument(
        "--chat-model", help="the same for the chat model (default: serve.chat_model, else its champion, if any)"
    )
    a = parser.parse_args(argv)
    say = logging.StreamHandler(sys.stdout)  # what the app builder says (e.g. that no chat model is served yet)
    say.setFormatter(logging.Formatter("serve: %(message)s"))
    logging.getLogger("pipelines.serve").addHandler(say)
    logging.getLogger("pipelines.serve").setLevel(logging.INFO)
    try:
        if a.command == "deploy":
            return deploy(a.model, a.chat_model)
        if a.command == "config":
            return config(a.model, a.chat_model)
        return status() if a.command == "status" else shutdown()
    except ParamsError as exc:  # names every bad key, one per line
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as exc:  # RuntimeError: Serve's deployment failures
        print(f"serve: error: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}", file=sys.stderr)
        return 1
