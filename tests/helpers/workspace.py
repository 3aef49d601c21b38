"""A tiny quill workspace (a git repo copy whose whole pipeline runs in about a minute), for the orchestration tests
(tests/integration/test_flows.py, test_make_run.py, test_setup_documented.py), and copies of a finished one."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.helpers.corpus import make_verse
from tests.helpers.paths import REPO, VENV_BIN, free_port
from tests.helpers.services import copy_store, move_store_paths

# Parameters that make `dvc repro` of all six stages take about a minute on 2 CPU cores.
TINY_PARAMS = {
    "data": {
        "sources": [{"type": "local", "path": "corpus"}],
        "min_chars": 50,
        "split": {"passage_chars": 400, "val": 0.1, "test": 0.1},
    },
    "tokenizer": {"vocab_size": 400},
    "model": {"preset": "tiny"},
    "train": {
        "max_steps": 8,
        "batch_size": 4,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "val_every": 4,
        "val_batches": 2,
        "log_every": 2,
        "checkpoint_every": 4,
        "seed": 7,
    },
    "eval": {
        "num_fewshot": [0],
        "max_items": 4,
        "batch_size": 8,
        "stride": 32,
        "sample_prompts": ["The king"],
        "samples_from_test": 1,
        "sample_max_tokens": 4,
    },
    "registry": {"model_name": "quill-test", "chat_model_name": "quill-test-chat"},
    # the fine-tuning stages on a few conversations the workspace holds (no wheel download, no plays)
    "finetune": {
        "sources": [{"type": "jsonl", "path": "chat"}],
        "max_steps": 4,
        "batch_size": 2,
        "warmup_steps": 1,
        "val_every": 2,
        "val_batches": 1,
        "log_every": 1,
        "checkpoint_every": 2,
        "split": {"val": 0.15, "test": 0.15},  # a few held-out conversations for chat_eval
        "eval": {"max_tokens": 8, "samples": 1},
    },
}
COPIED = ("pipelines", "model", "flows")
COPIED_FILES = ("dvc.yaml", ".dvcignore", "Makefile", ".gitignore", "requirements.lock")


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def tiny_workspace(root: Path, store: Path, serve_port: int | None = None) -> Path:
    """A committed git repo at `root` holding quill's code, dvc.yaml and a tiny params.yaml over a fixture corpus
    (serving on `serve_port`, a free one by default), with a copy of the migrated MLflow store `store`."""
    root.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in COPIED_FILES:
        shutil.copy2(REPO / name, root / name)
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_PARAMS)
    params["serve"]["port"] = serve_port or free_port()
    (root / "params.yaml").write_text("# tiny test params\n" + yaml.safe_dump(params, sort_keys=False))
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text("[core]\n    analytics = false\n    autostage = false\n")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for i in range(40):  # verse: the evaluate stage's cloze and next-line items need lines
        (root / "corpus" / f"verse_{i:03d}.txt").write_text(make_verse(rng), encoding="utf-8")
    (root / "chat").mkdir()
    with open(root / "chat" / "conversations.jsonl", "w", encoding="utf-8") as f:
        for _ in range(40):
            question, answer = make_verse(rng).splitlines()[:2]
            f.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
                )
                + "\n"
            )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny workspace"], cwd=root, check=True)
    copy_store(store, root)  # ignored by git (.gitignore), like a user's
    return root


def copy_workspace(src: Path, dst: Path, serve_port: int | None = None) -> Path:
    """A copy of a workspace (git history, DVC cache and lock, checkpoints, MLflow store) that shares nothing
    writable with it: the store's artifact paths point into the copy; serve.port becomes `serve_port` if given.
    DVC's own state (.dvc/tmp, keyed by inode) is left for DVC to rebuild."""

    def skipped(folder: str, names: list[str]) -> list[str]:
        here = Path(folder)
        return [n for n in names if (here == src and n in (".quill", ".venv")) or (here.name == ".dvc" and n == "tmp")]

    shutil.copytree(src, dst, symlinks=True, ignore=skipped)
    if (dst / "mlflow.db").is_file():
        move_store_paths(dst / "mlflow.db", str(src), str(dst))
    if serve_port:
        params = yaml.safe_load((dst / "params.yaml").read_text())
        params["serve"]["port"] = serve_port
        (dst / "params.yaml").write_text("# tiny test params\n" + yaml.safe_dump(params, sort_keys=False))
    return dst


def quill_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment a user has in `root`: the venv on PATH, the copy's own modules, its own MLflow store."""
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
        **extra,
    }
    env.pop("PYTHONPATH", None)
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env
