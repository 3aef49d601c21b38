"""What the serving tests share: a tiny model folder, its registration in an MLflow store, params for a test
server, and a loopback `ray start --head` that is stopped by pid (never `ray stop`, which stops every Ray of the
user, a colleague's too)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import psutil
import torch
import yaml
from mlflow import MlflowClient
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model import GPT, GPTConfig, save_pretrained
from pipelines.common.contracts import HF_ARTIFACT
from pipelines.register import pyfunc_model
from tests.helpers.paths import REPO, VENV_BIN, free_port

TEXT = [
    "To be, or not to be, that is the question.",
    "All the world's a stage, and all the men and women players.",
    "Émoji 🙂 and 中文 text; naïve café.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NAME = "tiny"


def tiny_model_folder(root: Path, seed: int, name: str = "model") -> Path:
    """A random tiny model (2 layers x 32) with a byte-level BPE tokenizer of TEXT, in root/<name>; served under
    that folder name."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT * 3, trainer)
    (root / "tok").mkdir(parents=True)
    tok.save(str(root / "tok" / "tokenizer.json"))
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(), block_size=1024, n_embd=32)
    return save_pretrained(GPT(cfg).eval(), root / name, tokenizer_dir=root / "tok")


def register(folder: Path, tracking: str) -> str:
    """Log the folder as quill's pyfunc model, register a version of NAME, make it champion; its version."""
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    root = Path(tracking.removeprefix("sqlite:///")).parent
    if mlflow.get_experiment_by_name(NAME) is None:  # artifacts in the test's folder, not the repository
        mlflow.create_experiment(NAME, artifact_location=(root / "mlartifacts").as_uri())
    mlflow.set_experiment(NAME)
    staged = root / "staged" / folder.parent.name / HF_ARTIFACT  # the logged folder keeps its name
    shutil.copytree(folder, staged)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="quill_pyfunc",
            python_model=pyfunc_model.__file__,
            artifacts={HF_ARTIFACT: str(staged)},
            pip_requirements=[],
            registered_model_name=NAME,
        )
    client = MlflowClient(tracking, tracking)
    version = str(info.registered_model_version)
    sha = json.loads((folder / "config.json").read_text()).get("tokenizer_sha256")
    if sha:
        client.set_model_version_tag(NAME, version, "tokenizer_sha256", sha)
    client.set_registered_model_alias(NAME, "champion", version)
    return version


def write_params(path: Path, **serve_overrides) -> Path:
    """The repository's params.yaml with serve.* overridden and registry.model_name = NAME."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["serve"].update(serve_overrides)
    params["registry"]["model_name"] = NAME
    path.write_text(yaml.safe_dump(params))
    return path


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


@contextmanager
def ray_tmpdir() -> Iterator[Path]:
    """A short private TMPDIR for Ray (its sockets' paths must stay under 107 bytes) and for the serve CLI's
    state file; a Ray started with it is found, and cleaned up, through this marker (see ray_processes)."""
    root = Path(tempfile.mkdtemp(prefix="qr", dir="/tmp"))
    try:
        yield root
    finally:
        kill(ray_processes(root))
        shutil.rmtree(root, ignore_errors=True)


def ray_processes(tmpdir: Path) -> list[psutil.Process]:
    """Every live process started with TMPDIR=tmpdir: a Ray's daemons, workers and actors all inherit it."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("TMPDIR") == str(tmpdir) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def kill(procs: list[psutil.Process]) -> None:
    """SIGTERM, and SIGKILL after 5 s: Ray's daemons linger on SIGTERM."""
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def listener(port: int) -> str:
    """The name of the process listening on a TCP port, at any address ("" when none is)."""
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid).name()
    return ""


def ray_env(tmpdir: Path) -> dict[str, str]:
    """The environment of Ray commands under `tmpdir`: the venv first, quill importable by the replicas."""
    env = {**os.environ, "TMPDIR": str(tmpdir), "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return env


@contextmanager
def ray_head(tmpdir: Path, cwd: Path) -> Iterator[dict]:
    """`ray start --head` in `cwd` on free loopback ports (dashboard on loopback only, a fixed metrics export port),
    as a cluster the tests deploy onto; stopped by pid afterwards. Yields its address, dashboard and metrics URLs
    and the environment of commands that talk to it."""
    gcs, dashboard, metrics = free_port(), free_port(), free_port()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--metrics-export-port", str(metrics),
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--num-cpus", "4", "--disable-usage-stats",
    ]  # fmt: skip
    # explicit: with RAY_AUTH_MODE unset, `ray start` turns token auth on when ~/.ray/auth_token exists, and then
    # every client (serve deploy, serve status) must be told RAY_AUTH_MODE=token
    env = {**ray_env(tmpdir), "RAY_AUTH_MODE": "disabled"}
    try:
        subprocess.run(cmd, env=env, cwd=cwd, check=True, capture_output=True, text=True, timeout=120)
        yield {
            "address": f"127.0.0.1:{gcs}",
            "dashboard": f"http://127.0.0.1:{dashboard}",
            "metrics": f"http://127.0.0.1:{metrics}/metrics",
            "env": env,
        }
    finally:
        kill(ray_processes(tmpdir))
