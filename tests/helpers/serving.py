"""What the serving tests share: a tiny model folder, its registration in an MLflow store, params for a test
server, this process joined to the session's Ray cluster, and a private temp dir for a Ray that quill's serve CLI
starts itself (stopped by pid, never `ray stop`, which stops every Ray of the user, a colleague's too)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import psutil
import ray
import torch
import yaml
from mlflow import MlflowClient
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils
from ray import serve
from ray._private.authentication_test_utils import reset_auth_token_state
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model import GPT, GPTConfig, save_pretrained
from pipelines.common.contracts import HF_ARTIFACT
from pipelines.common.registration import pyfunc_model
from tests.helpers.paths import REPO, VENV_BIN, free_port
from tests.helpers.services import kill, ray_processes, wait_for

TEXT = [
    "To be, or not to be, that is the question.",
    "All the world's a stage, and all the men and women players.",
    "Émoji 🙂 and 中文 text; naïve café.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NAME = "tiny"
CHAT_NAME = "tiny-chat"  # registry.chat_model_name in write_params' params


def tiny_model_folder(root: Path, seed: int, name: str = "model", chat: bool = True) -> Path:
    """A random tiny model (2 layers x 32) with a byte-level BPE tokenizer of TEXT, in root/<name>; served under
    that folder name. chat=False: its tokenizer has no ChatML markers, so the model has no chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS if chat else SPECIALS[:1],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT * 3, trainer)
    (root / "tok").mkdir(parents=True)
    tok.save(str(root / "tok" / "tokenizer.json"))
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(), block_size=1024, n_embd=32)
    return save_pretrained(GPT(cfg).eval(), root / name, tokenizer_dir=root / "tok")


def register(folder: Path, tracking: str, name: str = NAME) -> str:
    """Log the folder as quill's pyfunc model, register a version of `name`, make it champion; its version. MLflow's
    fluent API points at `tracking` only meanwhile: the process's URIs (and their variables) are put back."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    previous = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    try:
        return _register(folder, tracking, name)
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = previous
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _register(folder: Path, tracking: str, name: str) -> str:
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
            registered_model_name=name,
        )
    client = MlflowClient(tracking, tracking)
    version = str(info.registered_model_version)
    sha = json.loads((folder / "config.json").read_text()).get("tokenizer_sha256")
    if sha:
        client.set_model_version_tag(name, version, "tokenizer_sha256", sha)
    client.set_registered_model_alias(name, "champion", version)
    return version


def write_params(path: Path, **serve_overrides) -> Path:
    """The repository's params.yaml with serve.* overridden, registry.model_name = NAME and chat_model_name =
    CHAT_NAME."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["serve"].update(serve_overrides)
    params["registry"].update(model_name=NAME, chat_model_name=CHAT_NAME)
    path.write_text(yaml.safe_dump(params))
    return path


@contextmanager
def ray_tmpdir() -> Iterator[Path]:
    """A short private TMPDIR for a Ray that quill's serve CLI starts (its sockets' paths must stay under 107 bytes);
    every process of that Ray inherits it, which is how it is found and cleaned up."""
    root = Path(tempfile.mkdtemp(prefix="qr", dir="/tmp"))
    try:
        yield root
    finally:
        kill(ray_processes(root))
        shutil.rmtree(root, ignore_errors=True)


def listener(port: int) -> str:
    """The name of the process listening on a TCP port, at any address ("" when none is)."""
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid).name()
    return ""


def ray_env(tmpdir: Path) -> dict[str, str]:
    """The environment of a serve CLI that starts its own Ray under `tmpdir`: the venv first, quill importable by
    the replicas, no cluster to join."""
    env = {**os.environ, "TMPDIR": str(tmpdir), "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return env


@contextmanager
def joined(cluster: dict) -> Iterator[int]:
    """This process joined to `cluster` as a Ray driver with Ray Serve started on a free loopback port, which it
    yields. The cluster's token is in the environment only while joining:
    the commands tests run later must not join it by accident."""
    saved = {k: os.environ.get(k) for k in cluster["env"]}
    os.environ.update(cluster["env"])
    try:
        reset_auth_token_state()  # Ray reads the auth mode and token once per process; read them again
        ray.init(address=cluster["address"], log_to_driver=False, logging_level="ERROR")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()  # its HAProxy outlives a Ray stopped without this
        ray.shutdown()


def delete_apps(*names: str) -> None:
    """Delete these Serve apps of the shared cluster (those that exist), all at once, waiting until they are gone."""
    doomed = set(names) & set(serve.status().applications)
    for name in doomed:
        serve.delete(name, _blocking=False)
    wait_for(lambda: not doomed & set(serve.status().applications), 120, f"Serve apps {sorted(doomed)} deleted")
