"""`python -m pipelines.serve`: deploy (or roll over to) a model on Ray Serve, report on it, stop it.

    python -m pipelines.serve [--model URI|PATH]   # start or join Ray, deploy quill, print the endpoint, return
    python -m pipelines.serve status                # what is deployed; exit 0 when healthy
    python -m pipelines.serve shutdown              # delete the app; stop Ray too if this command started it
    python -m pipelines.serve config [--model ...]  # a Serve config file for `serve deploy` / a KubeRay RayService

Without RAY_ADDRESS a detached local Ray (`ray start --head`, dashboard on loopback) is started on first use
and recorded in STATE, so `shutdown` stops exactly what it started.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import ray
import yaml
from ray import serve

from pipelines.common.params import ParamsError, ServeParams, load_params
from pipelines.common.tracking import tracking_uri
from pipelines.serve import APP_NAME, AppArgs, app

REPO = Path(__file__).resolve().parents[2]
STATE = Path(tempfile.gettempdir()) / "quill-serve-ray.json"  # present while a Ray we started runs
RAY = Path(sys.executable).parent / "ray"


def connect() -> bool:
    """Join RAY_ADDRESS or a local instance; False if there is none."""
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", logging_level="ERROR", log_to_driver=False)
        return True
    except ConnectionError:
        return False


def start_local_ray() -> None:
    """A detached head node that outlives this command; the replicas import quill from this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [str(RAY), "start", "--head", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    STATE.write_text(json.dumps({"started_by": "pipelines.serve", "cwd": str(Path.cwd())}))


def deploy(model: str | None) -> int:
    params = load_params()
    if not connect():
        if os.environ.get("RAY_ADDRESS"):
            print(f"serve: error: no Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}", file=sys.stderr)
            return 1
        print("serve: starting a local Ray instance (ray start --head)", flush=True)
        start_local_ray()
        connect()
    p = params.serve
    serve.start(http_options={"host": p.host, "port": p.port})
    running = APP_NAME in serve.status().applications
    print(
        f"serve: {'rolling update of' if running else 'deploying'} {model or p.model or 'the champion'} ...", flush=True
    )
    serve.run(app(AppArgs(model=model, tracking_uri=tracking_uri())), name=APP_NAME, route_prefix="/")
    card = _models(p)
    url = f"http://{p.host}:{p.port}"
    print(f"serve: {card['id']} (version {card['version']}, {card['uri']}) at {url}/v1")
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
        card = _models(params.serve)
    except (httpx.HTTPError, KeyError) as exc:
        print(f"serve: {state}, endpoint not answering ({exc})")
        return 1
    p = params.serve
    print(f"serve: {state}: {card['id']} version {card['version']} ({card['uri']}) at http://{p.host}:{p.port}/v1")
    return 0 if state == "RUNNING" else 1


def shutdown() -> int:
    if connect():
        if APP_NAME in serve.status().applications:
            serve.delete(APP_NAME)
            print("serve: quill deleted")
        if not serve.status().applications:
            serve.shutdown()
        ray.shutdown()
    if STATE.exists():  # only a Ray this command started is stopped
        subprocess.run([str(RAY), "stop"], check=False, capture_output=True)
        STATE.unlink()
        print("serve: local Ray stopped")
    return 0


def config(model: str | None) -> int:
    """A Serve config for `serve deploy` (or a RayService's serveConfigV2), pinned like a deploy would be."""
    params = load_params()
    p = params.serve
    args = {
        "model": model or p.model or f"models:/{params.registry.model_name}@champion",
        "tracking_uri": tracking_uri(),
    }
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": p.host, "port": p.port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "pipelines.serve:app", "args": args}],
    }
    print(yaml.safe_dump(doc, sort_keys=False), end="")
    return 0


def _models(p: ServeParams) -> dict:
    headers = {"Authorization": f"Bearer {os.environ['QUILL_API_KEY']}"} if os.environ.get("QUILL_API_KEY") else {}
    r = httpx.get(f"http://{p.host}:{p.port}/v1/models", headers=headers, timeout=10)
    r.raise_for_status()
    return r.json()["data"][0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="deploy", choices=["deploy", "status", "shutdown", "config"])
    parser.add_argument("--model", help="registry URI (models:/name@alias, models:/name/3) or a local model folder")
    a = parser.parse_args(argv)
    try:
        if a.command == "deploy":
            return deploy(a.model)
        if a.command == "config":
            return config(a.model)
        return status() if a.command == "status" else shutdown()
    except (ParamsError, ValueError) as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # Serve's deployment failures (the replica's error is in the message)
        print(f"serve: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
