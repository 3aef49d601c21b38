"""Where the data stages do their work: `data.engine: local | ray` (params.yaml).

A stage cuts its work into independent tasks (a shard of raw files to clean, a byte range of a split to encode)
and a pure, module-level function that does one task and returns a small JSON-able summary; what a task makes
it writes to files under the stage's scratch folder. An `Engine` runs them step after step and returns each
step's summaries in task order, so the same functions give the same outputs, byte for byte, on either engine:

- `local`: a process pool with one worker per core (`data.workers`), or the stage's own process for a single
  task or a step of under 32 MB (the default corpus: no pool to start);
- `ray`: Ray Data (`ray.data.range(n).map(...)`) on the cluster named by RAY_ADDRESS, or on a local Ray
  instance started for the stage and stopped after it. Tasks read and write the project's files, so every node
  must see the project folder at the same path (a shared filesystem; README: "Data at corpus scale").

    >>> with Engine(params.data, preload=["pipelines.clean.shards"]) as engine:
    ...     read = engine.run(read_shard, shards, desc="clean: read", size=lambda s: s["bytes"])
    ...     engine.run(exact_part, partitions, desc="clean: exact duplicates", size=len, unit="partition")

`run_tasks(fn, tasks, params, ...)` is one step on an engine of its own.

Progress (bytes or documents done, throughput, ETA) is a `pipelines.common.progress.reporter` either way.
"""

from __future__ import annotations

import ctypes
import functools
import json
import multiprocessing
import os
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from pipelines.common.errors import StageError
from pipelines.common.params import DataParams
from pipelines.common.progress import reporter

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]  # put on the Ray workers' PYTHONPATH, so they import pipelines
INLINE_BYTES = 32 << 20  # a local step of less work than this runs in the stage's process: a pool costs more
PROBE_S = 3.0  # how long RAY_ADDRESS may take to accept a connection before the stage says it is not there


class EngineError(StageError):
    """The engine cannot run the stage's tasks (no Ray cluster at RAY_ADDRESS); the message says what to do."""


def workers(params: DataParams) -> int:
    """Local processes: data.workers, else one per core this process may use."""
    return params.workers or _cores()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _share_cores(threads: int) -> None:
    """In each pool worker: the tokenizers library's thread pool (Rust's rayon) gets the worker's share of the
    cores, not all of them in every worker (which oversubscribes them); a value the user set is kept."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))


class Engine:
    """The stage's engine, opened once and reused by every step: the process pool (started at the first step
    with more than one task) or the Ray connection (at the first step); closed when the stage ends.
    `preload`: modules the pool's workers import once, before their first task."""

    def __init__(self, params: DataParams, preload: Sequence[str] = ()) -> None:
        self.params, self.preload = params, list(preload)
        self._pool: ProcessPoolExecutor | None = None
        self._ray_started_here: bool | None = None  # None: not connected yet

    def run(
        self, fn: Callable[[T], Any], tasks: Sequence[T], *, desc: str, size: Callable[[T], int], unit: str = "B"
    ) -> list[Any]:
        """fn(task) for every task; the results in task order. Progress counts size(task)."""
        fn = functools.partial(_as_json, fn)  # both engines hand back the same JSON values
        with reporter(sum(size(t) for t in tasks), desc, unit, unit_scale=unit == "B") as progress:
            if self.params.engine == "ray":
                if self._ray_started_here is None:
                    self._ray_started_here = connect_ray()
                return _on_ray(fn, tasks, progress, size)
            small = unit == "B" and sum(size(t) for t in tasks) < INLINE_BYTES
            if small or min(workers(self.params), len(tasks)) <= 1:
                results = []
                for task in tasks:
                    results.append(fn(task))
                    progress.update(size(task))
                return results
            return _on_pool(self._local_pool(), fn, tasks, progress, size)

    def _local_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # forkserver: workers start from a clean process that imported `preload` once (no inherited threads
            # or memory, so per-process resident memory is honest); spawn where there is none (macOS)
            if "forkserver" in multiprocessing.get_all_start_methods():
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(self.preload)
            else:
                context = multiprocessing.get_context("spawn")
            n = workers(self.params)
            self._pool = ProcessPoolExecutor(
                max_workers=n, mp_context=context, initializer=_share_cores, initargs=(max(1, _cores() // n),)
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._ray_started_here:
            import ray  # only the ray engine gets here

            ray.shutdown()
        self._ray_started_here = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_tasks(
    fn: Callable[[T], Any],
    tasks: Sequence[T],
    params: DataParams,
    *,
    desc: str,
    size: Callable[[T], int],
    unit: str = "B",
) -> list[Any]:
    """One step on an Engine of its own: fn(task) for every task, the results in task order."""
    with Engine(params, preload=[fn.__module__]) as engine:
        return engine.run(fn, tasks, desc=desc, size=size, unit=unit)


def _as_json(fn: Callable[[T], Any], task: T) -> Any:
    try:
        return json.loads(json.dumps(fn(task)))
    finally:
        release_freed_memory()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's; musl and macOS have none
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the pages a finished task freed back to the OS (glibc keeps them in the heap): a worker's resident
    memory is then what its current task holds, not the most that any earlier task held."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


def _on_pool(pool: ProcessPoolExecutor, fn, tasks, progress, size) -> list[Any]:
    results: list[Any] = [None] * len(tasks)
    pending = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                results[i] = future.result()  # a task's error is raised here, as the stage's own
                progress.update(size(tasks[i]))
    except BaseException:
        for future in pending:
            future.cancel()
        raise
    return results


# --- Ray ------------------------------------------------------------------------------------------


def _reachable(address: str) -> bool:
    """Whether host:port accepts a TCP connection (ray.init would otherwise retry for minutes)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return True  # "auto", "ray://...", a name: let Ray resolve it
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=PROBE_S):
            return True
    except OSError:
        return False


def connect_ray() -> bool:
    """Join RAY_ADDRESS, or start a local Ray instance; True when this call started it (the caller stops it)."""
    import ray  # heavy, and only the ray engine needs it

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    env_vars = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "RAYON_NUM_THREADS": os.environ.get("RAYON_NUM_THREADS", "1"),  # a task has one CPU (see _share_cores)
    }
    runtime_env = {"env_vars": env_vars}
    hint = "start one (`ray start --head`), unset RAY_ADDRESS for a local Ray instance, or set data.engine: local"
    if address and not _reachable(address):
        raise EngineError(f"data.engine is ray but no Ray cluster answers at RAY_ADDRESS={address}: {hint}")
    try:
        ray.init(
            address=address or "local",  # "local": a new instance, never a `ray start` found on this machine
            runtime_env=runtime_env,
            logging_level="ERROR",
            log_to_driver=False,
            include_dashboard=False if not address else None,
        )
    except (ConnectionError, RuntimeError) as exc:
        raise EngineError(f"data.engine is ray but Ray did not start or join ({exc}): {hint}") from None
    return not address


def _on_ray(fn, tasks, progress, size) -> list[Any]:
    import ray  # heavy, and only the ray engine needs it

    ray.data.DataContext.get_current().enable_progress_bars = False  # the stage's own progress says it
    # One block per task, so each task is a Ray task of its own; the closure ships fn and the task list once.
    dataset = ray.data.range(len(tasks), override_num_blocks=len(tasks)).map(
        functools.partial(_ray_row, fn, tasks), num_cpus=1
    )
    results: list[Any] = [None] * len(tasks)
    for row in dataset.iter_rows():
        if row["error"]:
            raise StageError(row["error"])
        i = int(row["i"])
        results[i] = json.loads(row["result"])
        progress.update(size(tasks[i]))
    return results


def _ray_row(fn: Callable[[T], Any], tasks: Sequence[T], row: dict) -> dict:
    """One task on a Ray worker. A StageError (a full disk, say) comes back as its message, to be raised by the
    stage as its own one-line error (Ray's wrappers would lose it); anything else is a bug and keeps its trace."""
    try:
        return {"i": row["id"], "result": json.dumps(fn(tasks[row["id"]])), "error": ""}
    except StageError as exc:
        return {"i": row["id"], "result": "null", "error": str(exc)}
