"""pipelines/common/engine.py: results in task order from a pool of workers, a task's StageError as the stage's
own one-line error, and a clear error, at once, when RAY_ADDRESS names no cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.common.engine import Engine
from pipelines.common.errors import StageError
from pipelines.common.params import DataParams
from tests.helpers.corpus import raw_from_folder, write_corpus
from tests.helpers.paths import REPO, free_port

PARAMS = DataParams(sources=[{"type": "local", "path": "corpus"}], workers=2)


def square_with_pid(n: int) -> dict:
    if n < 0:
        raise StageError(f"task {n} cannot run: the disk is full")
    return {"square": n * n, "pid": os.getpid(), "pair": (n, n)}


def test_a_pool_returns_json_results_in_task_order() -> None:
    with Engine(PARAMS, preload=[__name__]) as engine:
        results = engine.run(square_with_pid, list(range(12)), desc="squares", size=lambda _: 1, unit="task")
        again = engine.run(square_with_pid, [5, 6], desc="squares", size=lambda _: 1, unit="task")
    assert [r["square"] for r in results] == [n * n for n in range(12)]
    assert all(r["pid"] != os.getpid() for r in results)  # in the pool's workers, not here
    assert results[3]["pair"] == [3, 3]  # JSON values, as the Ray engine hands them back
    assert [r["square"] for r in again] == [25, 36]  # the same pool serves the next step


def test_a_tasks_stage_error_is_the_stages_error() -> None:
    with Engine(PARAMS, preload=[__name__]) as engine, pytest.raises(StageError, match="task -1 cannot run"):
        engine.run(square_with_pid, [1, -1, 2], desc="squares", size=lambda _: 1, unit="task")


def test_ray_address_that_answers_nothing_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus", n_docs=3)
    raw_from_folder(tmp_path / "corpus", tmp_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(sources=[{"type": "local", "path": "corpus"}], engine="ray")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    address = f"127.0.0.1:{free_port()}"
    run = subprocess.run(
        [sys.executable, "-m", "pipelines.clean", "--root", str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"clean: error: data.engine is ray but no Ray cluster answers at RAY_ADDRESS={address}: start one "
        "(`ray start --head`), unset RAY_ADDRESS for a local Ray instance, or set data.engine: local"
    ]
    assert not (tmp_path / "data" / "clean").exists()
