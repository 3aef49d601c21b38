"""The real services integration tests share, each started once per session (tests/conftest.py) on free loopback
ports from docker-compose.yml's own command for it, so the team stack's commands are the ones that run: a Prefect
server, an MLflow tracking server behind basic auth, and a Ray head in Serve's high-throughput mode with token
auth. Also a migrated empty MLflow store, which a test copies instead of migrating its schema again."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import yaml
from mlflow import MlflowClient

from pipelines.serve import HIGH_THROUGHPUT_ENV
from tests.helpers.paths import REPO, VENV_BIN, free_port

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def compose_command(service: str, **replace: str) -> list[str]:
    """The service's command from docker-compose.yml, `--flag=value` (or `--flag value`) values replaced, the
    executable taken from the venv."""
    args = list(COMPOSE["services"][service]["command"])
    for flag, value in replace.items():
        flag = "--" + flag.replace("_", "-")
        for i, arg in enumerate(args):
            if arg.startswith(flag + "="):
                args[i] = f"{flag}={value}"
            elif arg == flag:
                args[i + 1] = value
    return [str(VENV_BIN / args[0]), *args[1:]]


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 0.5):
    """Poll `check` until it returns something truthy (returned); AssertionError naming `what` at the timeout.
    Exceptions count as not yet."""
    deadline = time.time() + timeout
    last: object = None
    while time.time() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Until `url` answers 200; AssertionError naming the URL when `proc` exits first or at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextmanager
def started(cmd: list[str], env: dict[str, str], log: Path, health: str, **wait) -> Iterator[subprocess.Popen]:
    """`cmd` in a process group of its own, output in `log`, until `health` answers; stopped afterwards."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                wait_http(health, proc, **wait)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{log.read_text()[-3000:]}") from None
            yield proc
        finally:
            stop(proc)


PREFECT_AUTH = ("quill", "s3cret-for-test")  # the compose stack's PREFECT_AUTH_STRING, user:password


def prefect_env(home: Path, port: int) -> dict[str, str]:
    """Settings for a Prefect server's clients (its database lives in `home`), logged in as the team stack's are."""
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_AUTH_STRING": ":".join(PREFECT_AUTH),
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }


@contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """The compose file's `prefect server start` on a free loopback port (a SQLite database in `home` for
    PostgreSQL); yields the env that points clients at it, and the command it ran as PREFECT_TEST_COMMAND."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = prefect_env(home, port)
    cmd = compose_command("prefect", host="127.0.0.1", port=str(port))
    server_env = {**os.environ, **env, "PREFECT_SERVER_API_AUTH_STRING": ":".join(PREFECT_AUTH)}  # as in compose
    with started(cmd, server_env, home / "server.log", f"http://127.0.0.1:{port}/api/health"):
        yield {**env, "PREFECT_TEST_COMMAND": " ".join(cmd)}


MLFLOW_ADMIN = ("admin", "s3cret-for-test")


@contextmanager
def mlflow_server(root: Path) -> Iterator[dict[str, str]]:
    """The compose file's `mlflow server --app-name basic-auth` on a free loopback port (SQLite for PostgreSQL, a
    folder for S3); yields the URI, and the environment of a client logged in as its admin."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth = COMPOSE["configs"]["mlflow-auth"]["content"]  # the team stack's auth config, SQLite for PostgreSQL
    auth = re.sub(r"(?m)^database_uri = .*$", f"database_uri = sqlite:///{root}/auth.db", auth)
    auth = auth.replace("${MLFLOW_ADMIN_USER}", MLFLOW_ADMIN[0]).replace("${MLFLOW_ADMIN_PASSWORD}", MLFLOW_ADMIN[1])
    assert "${" not in auth, auth
    (root / "auth.ini").write_text(auth)
    cmd = compose_command(
        "mlflow",
        host="127.0.0.1",
        port=str(port),
        backend_store_uri=f"sqlite:///{root}/mlflow.db",
        artifacts_destination=str(root / "artifacts"),
    )
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test"}
    env.pop("MLFLOW_TRACKING_URI", None)
    uri = f"http://127.0.0.1:{port}"
    with started(cmd, env, root / "server.log", f"{uri}/health"):
        yield {
            "uri": uri,
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN[0],
            "MLFLOW_TRACKING_PASSWORD": MLFLOW_ADMIN[1],
        }


def ray_processes(tmpdir: Path) -> list[psutil.Process]:
    """Every live process of a Ray whose temp dir is `tmpdir`: they all inherit TMPDIR=tmpdir or name it."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get("TMPDIR") == str(tmpdir) or str(tmpdir) in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            pass
    return found


def kill(procs: list[psutil.Process], timeout: float = 5) -> None:
    """SIGTERM, and SIGKILL after `timeout` s: Ray's daemons linger on SIGTERM."""
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@contextmanager
def ray_cluster(tmpdir: Path, home: Path, num_cpus: int = 8) -> Iterator[dict]:
    """The compose file's Ray head (`ray start --head --block`, token auth, Serve's high-throughput mode) with every
    port of Ray's free and on loopback; `tmpdir` is its short temp dir (socket paths must fit in 107 bytes).
    Its workers run in `home`, as they would in an image's working directory (a Serve config's relative paths
    resolve there), and import quill from this checkout. Yields its address, dashboard and metrics URLs, and
    `env`: what a client (ray.init, the serve CLI, `serve deploy`) needs to join it. Stopped by pid afterwards;
    AssertionError if a process of it is still there then."""
    gcs, dashboard, metrics = free_port(), free_port(), free_port()
    cmd = [
        *compose_command("ray-head", port=str(gcs), dashboard_host="127.0.0.1"),
        "--node-ip-address=127.0.0.1", f"--temp-dir={tmpdir}", f"--dashboard-port={dashboard}",
        f"--metrics-export-port={metrics}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--num-cpus={num_cpus}", "--object-store-memory=200000000",
        "--disable-usage-stats",
    ]  # fmt: skip
    client = {"RAY_ADDRESS": f"127.0.0.1:{gcs}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    head_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head_env.update(
        PYTHONPATH=str(REPO),
        TMPDIR=str(tmpdir),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=client["RAY_AUTH_TOKEN"],
        RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
        RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
        # a replica behind HAProxy that is stopped (an app deleted or updated) keeps serving while HAProxy reloads
        # without it: 30 s by default, a third of that here (every update and delete waits it out); HAProxy takes
        # a second or two for it, longer on a loaded machine
        RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="10",
        **HIGH_THROUGHPUT_ENV,
    )
    log = open(tmpdir / "head.log", "w")
    proc = subprocess.Popen(cmd, cwd=home, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        status = [str(VENV_BIN / "ray"), "status", f"--address={client['RAY_ADDRESS']}"]  # the compose health check
        deadline = time.monotonic() + 120
        while subprocess.run(status, env=head_env, capture_output=True, timeout=60).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the Ray head did not answer `ray status`:\n{(tmpdir / 'head.log').read_text()}")
            time.sleep(1)
        yield {
            "address": client["RAY_ADDRESS"],
            "dashboard": f"http://127.0.0.1:{dashboard}",
            "metrics": f"http://127.0.0.1:{metrics}/metrics",
            "command": cmd,
            "tmpdir": tmpdir,
            "home": home,
            "env": client,
        }
    finally:
        # `ray start --block` stops its processes on SIGTERM, but takes about 30 s once Serve has run (its idle
        # workers linger); the session's end need not wait for that: what is left after 5 s is killed
        stop(proc, timeout=5)
        log.close()
        kill(ray_processes(tmpdir), timeout=0)
    left = ray_processes(tmpdir)
    assert not left, f"processes of the session's Ray outlived it: {[(p.pid, p.name()) for p in left]}"


def migrate_store(folder: Path) -> Path:
    """An empty MLflow SQLite store at folder/mlflow.db with its schema migrated (a second or so each time)."""
    folder.mkdir(parents=True, exist_ok=True)
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


def copy_store(template: Path, folder: Path) -> str:
    """A copy of a migrated store as folder/mlflow.db; its tracking URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def move_store_paths(db: Path, old: str, new: str) -> None:
    """Rewrite every absolute path under `old` in an MLflow SQLite store to `new` (artifact locations, run and model
    version sources), so a copied workspace's store points at the copy's own artifacts."""
    with sqlite3.connect(db) as conn:
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for column in conn.execute(f"PRAGMA table_info('{table}')").fetchall():
                name, kind = column[1], column[2].upper()
                if "CHAR" in kind or "TEXT" in kind:
                    conn.execute(
                        f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) WHERE "{name}" LIKE ?',
                        (old, new, f"%{old}%"),
                    )
