"""`make run`, `make stop`, `make status`: quill's local services, started once and recorded by process id.

    python -m flows.stack run      start what is not running, run train_and_deploy against it, print where things are
    python -m flows.stack stop     stop exactly what `run` started (the pids under .quill/pids/), and the serving app
    python -m flows.stack status   list them

`run` starts a Prefect server (PREFECT_API_URL, default http://127.0.0.1:4200/api; its database under
.quill/prefect/) unless one answers there, `python -m flows.deploy` so the flows have Run buttons in the UI, and
the MLflow UI: `mlflow server` on the stages' own store (MLFLOW_TRACKING_URI, default the project's mlflow.db with
artifacts in mlartifacts/) at http://127.0.0.1:5000, or the next free port; a tracking server is its own UI. Then it
runs train_and_deploy (through DVC: a second run with nothing changed retrains nothing) which deploys the champion
with the serve CLI (it starts or joins Ray). The services stay up; logs are in .quill/logs/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import psutil

from flows.lock import WorkspaceBusy, workspace_lock
from flows.overrides import check, recover
from flows.serving import endpoint, serve_cli
from pipelines.common.params import ParamsError
from pipelines.common.tracking import TrackingError, artifact_root, check_tracking, tracking_uri
from pipelines.summary import main as print_summary

STATE = Path(".quill")
PIDS = STATE / "pids"
LOGS = STATE / "logs"
DEFAULT_PREFECT_API = "http://127.0.0.1:4200/api"
LOOPBACK = "127.0.0.1"
MLFLOW_UI_PORT = 5000  # MLflow's own default; the next free port above it when taken (macOS's AirPlay takes 5000)


class StackError(RuntimeError):
    """A service cannot start; the message says which setting to change."""


def prefect_api() -> str:
    return os.environ.get("PREFECT_API_URL") or DEFAULT_PREFECT_API


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def serving_available() -> bool:
    """Whether the serve CLI (pipelines/serve/__main__.py) exists in this checkout."""
    return importlib.util.find_spec("pipelines.serve.__main__") is not None


# --- recorded processes --------------------------------------------------------------------------


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def recorded() -> dict[str, dict]:
    """{name: {pid, cmd, url}} of the processes `run` started, as recorded."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(PIDS.glob("*.json"))} if PIDS.is_dir() else {}


def started_at(pid: int) -> float | None:
    """When the process with this pid started (seconds since the epoch), None if there is none."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(entry: dict) -> bool:
    """The recorded process still runs: the pid's process started when the recorded one did, so a pid the kernel
    has since given to another process is never taken for it (records without a start time: the whole command
    line must match)."""
    if entry.get("started") is not None:
        return started_at(entry["pid"]) == entry["started"]
    return " ".join(entry["cmd"]) in cmdline(entry["pid"])


def start(name: str, cmd: list[str], env: dict[str, str], url: str) -> tuple[dict, subprocess.Popen]:
    """Start `cmd` in its own session (so `stop` can end its whole process group), logging to .quill/logs/."""
    PIDS.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(LOGS / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    started = started_at(proc.pid)
    entry = {"pid": proc.pid, "started": started, "cmd": cmd, "url": url, "log": str(LOGS / f"{name}.log")}
    (PIDS / f"{name}.json").write_text(json.dumps(entry))
    return entry, proc


def wait_until_up(name: str, what: str, entry: dict, proc: subprocess.Popen, url: str, timeout: float = 180) -> None:
    """Poll `url` until it answers; a process that exits or never answers is stopped, its record dropped, and named
    with its log."""
    deadline = time.time() + timeout
    while not answers(url):
        if proc.poll() is not None or time.time() > deadline:  # (its /proc cmdline lags until it has exec'd)
            why = f"exited with {proc.returncode}" if proc.returncode is not None else f"no answer in {timeout:.0f} s"
            terminate(entry, timeout=10)
            (PIDS / f"{name}.json").unlink(missing_ok=True)
            raise StackError(f"{what} did not start at {url} ({why}); see {entry['log']}")
        time.sleep(1)


def terminate(entry: dict, timeout: float = 30) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `timeout`."""
    pid = entry["pid"]
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
            except ChildProcessError:
                pass
            time.sleep(0.2)


# --- the commands ---------------------------------------------------------------------------------


def ensure_prefect() -> str:
    """The Prefect API URL, a server answering there (started here if needed)."""
    api = prefect_api()
    if answers(f"{api}/health"):
        return api
    parsed = urlparse(api)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 4200
    if host not in ("127.0.0.1", "localhost"):
        raise StackError(
            f"no Prefect server answers at PREFECT_API_URL={api}; start it, or unset PREFECT_API_URL to use a local one"
        )
    if port_taken(host, port):
        raise StackError(
            f"port {port} on {host} is taken by a program that is not a Prefect server; stop it, or set "
            f"PREFECT_API_URL=http://127.0.0.1:<free port>/api to start quill's Prefect server there"
        )
    home = (STATE / "prefect").resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }
    prefect = str(Path(sys.executable).with_name("prefect"))
    entry, proc = start(
        "prefect-server",
        [prefect, "server", "start", "--host", host, "--port", str(port)],
        env,
        api.removesuffix("/api"),
    )
    wait_until_up("prefect-server", "the Prefect server", entry, proc, f"{api}/health")
    print(f"started the Prefect server (pid {entry['pid']}) at {entry['url']}")
    return api


def ensure_deployments(api: str) -> None:
    """`python -m flows.deploy` in the background (Run buttons in the UI), unless the recorded one still runs."""
    entry = recorded().get("flows-deploy")
    if entry and alive(entry):
        return
    entry, _ = start(
        "flows-deploy",
        [sys.executable, "-m", "flows.deploy"],
        {**os.environ, "PREFECT_API_URL": api},
        api.removesuffix("/api") + "/deployments",
    )
    print(f"serving the flows' deployments (pid {entry['pid']})")


def local_store(uri: str) -> str:
    """The tracking URI with a SQLite file's path made absolute (the same store from any folder)."""
    return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}" if uri.startswith("sqlite:///") else uri


def first_free_port(host: str, first: int, count: int = 100) -> int:
    """`first`, or the next port above it that nothing holds on `host`."""
    for port in range(first, first + count):
        if not port_taken(host, port):
            return port
    raise StackError(f"ports {first} to {first + count - 1} on {host} are all taken; free one for the MLflow UI")


def ensure_mlflow_ui() -> str:
    """The MLflow UI's URL for the store the stages log to (MLFLOW_TRACKING_URI). A tracking server is its own UI
    (checked to answer); a local store gets `mlflow server` on it, started here unless the one recorded for that
    store still runs, on 127.0.0.1:5000 or the next free port."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            return check_tracking().rstrip("/")
        except TrackingError as exc:
            raise StackError(str(exc)) from None
    store = local_store(uri)
    entry = recorded().get("mlflow-ui")
    if entry and alive(entry):
        if store in entry["cmd"]:
            return entry["url"]
        terminate(entry)  # MLFLOW_TRACKING_URI names another store since
        print(f"stopped the MLflow UI of another store (pid {entry['pid']})")
    port = first_free_port(LOOPBACK, MLFLOW_UI_PORT)
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow, "server", "--backend-store-uri", store, "--host", LOOPBACK, "--port", str(port), "--workers", "1"]
    if artifacts := artifact_root(store):  # mlartifacts/ beside the SQLite file, as the stages' experiments have it
        cmd += ["--artifacts-destination", artifacts]
    # no job runner: nothing but the stages and this UI touches the SQLite file
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    entry, proc = start("mlflow-ui", cmd, env, f"http://{LOOPBACK}:{port}")
    wait_until_up("mlflow-ui", "the MLflow UI", entry, proc, f"{entry['url']}/health")
    print(f"started the MLflow UI (pid {entry['pid']}) at {entry['url']}")
    return entry["url"]


def check_serve_port(url: str, host: str, port: int) -> None:
    if port_taken(host, port) and not answers(f"{url}/health"):
        raise StackError(
            f"port {port} on {host} is taken by another program; stop it, or set serve.port in "
            "params.yaml to a free port"
        )


def run(args: argparse.Namespace) -> int:
    params = check({})
    url = endpoint(params.serve)
    deploy = serving_available()
    if deploy:
        check_serve_port(url, params.serve.host, params.serve.port)
    api = ensure_prefect()
    ensure_deployments(api)
    mlflow_url = ensure_mlflow_ui()
    cmd = [sys.executable, "-m", "flows.train_and_deploy", *(["--no-deploy"] if not deploy else [])]
    if not deploy:
        print("pipelines/serve has no CLI in this checkout yet: running the pipeline without deploying")
    started = time.monotonic()
    result = subprocess.run(cmd, env={**os.environ, "PREFECT_API_URL": api})
    if result.returncode != 0:
        return result.returncode
    if deploy:
        (PIDS / "serving.json").write_text(json.dumps({"url": url, "stop": "python -m pipelines.serve shutdown"}))
    print_summary([])
    ui = api.removesuffix("/api")
    auth = ' -H "Authorization: Bearer $QUILL_API_KEY"' if os.environ.get("QUILL_API_KEY") else ""
    print(f"\ntrain_and_deploy finished in {time.monotonic() - started:.0f} s. Where things are:")
    if deploy:
        print(f"  endpoint    {url}/v1  (OpenAI-compatible)")
        print(
            f"    curl {url}/v1/completions{auth} -H 'Content-Type: application/json' "
            """-d '{"model": "%s", "prompt": "ROMEO:", "max_tokens": 40}'""" % params.registry.model_name
        )
        print(
            f"    python -c \"import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='"
            f"{'$QUILL_API_KEY' if auth else 'none'}'); print(c.completions.create(model='"
            f"{params.registry.model_name}', prompt='ROMEO:', max_tokens=40).choices[0].text)\""
        )
        if params.finetune is not None:  # the chat model is served beside the base once registered
            print(
                f"    curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
                """-d '{"messages": [{"role": "user", "content": "How was your weekend?"}], "max_tokens": 40}'"""
            )
    print(f"  Prefect UI  {ui}  (flow runs; deployments with Run buttons)")
    print(f"  MLflow UI   {mlflow_url}  (runs, metrics, registered models)")
    print("  compare with the last commit: .venv/bin/dvc metrics diff; plots: .venv/bin/dvc plots show")
    print("  make status lists the services; make stop stops them")
    return 0


def stop_service(name: str, entry: dict) -> str | None:
    """Stop one recorded process and drop its record; what happened, for the user."""
    said = None
    if "pid" in entry:
        if alive(entry):
            terminate(entry)
            said = f"stopped {name} (pid {entry['pid']})"
        else:
            said = f"{name} (pid {entry['pid']}) was not running"
    (PIDS / f"{name}.json").unlink()
    return said


def stop(args: argparse.Namespace) -> int:
    services = recorded()
    # side by side, as Serve drains its replicas before it shuts down, and each server takes seconds to exit; the
    # Prefect server last, as the deployments' process retries its API for half a minute once it is gone
    last = {name: entry for name, entry in services.items() if name == "prefect-server"}
    with ThreadPoolExecutor(max_workers=len(services) + 1) as pool:
        serving = "serving" in services and serving_available()
        shutdown = pool.submit(serve_cli, "shutdown", timeout=120) if serving else None
        stopped = [pool.submit(stop_service, name, entry) for name, entry in services.items() if name not in last]
        said = [future.result() for future in stopped] + [stop_service(name, entry) for name, entry in last.items()]
        if shutdown is not None:
            result = shutdown.result()
            print(f"serving: {'shut down' if result.returncode == 0 else result.stderr.strip()[-300:]}")
    for line in filter(None, said):
        print(line)
    if not services:
        print("nothing that quill started is running")
    put_back_params()
    return 0


def put_back_params() -> None:
    """A flow run killed while its overrides were in params.yaml left them there: put the user's file back, unless
    a run (started some other way than `make run`) holds the workspace and still needs them."""
    try:
        with workspace_lock("make stop"):
            if recover():
                print("params.yaml held a killed run's overrides: the original is back")
    except WorkspaceBusy as exc:
        print(f"params.yaml left as it is: {exc}")


def status(args: argparse.Namespace) -> int:
    services = recorded()
    for name, entry in services.items():
        if "pid" in entry:
            state = f"running, pid {entry['pid']}" if alive(entry) else f"not running (pid {entry['pid']} recorded)"
        else:
            state = "deployed" if serving_available() and serve_cli("status", timeout=60).returncode == 0 else "down"
        print(f"{name:15} {state:35} {entry['url']}")
    if not services:
        print("nothing started by quill (make run starts it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "stop", "status"])
    args = parser.parse_args(argv)
    try:
        return {"run": run, "stop": stop, "status": status}[args.command](args)
    except (StackError, ParamsError) as exc:
        print(f"make {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
