"""The model and its continuous-batching scheduler in a child process of the replica.

A replica's event loop (HTTP, Ray's own streaming to the proxy, JSON) and the decode loop are both Python, and
one process runs Python on one core at a time (the GIL): under streaming load the decode steps of a replica
stretched to twice their length waiting for it. Here the decode loop has a process, and so a core, of its own,
as vLLM's engine core does; the replica and this process talk over a pipe.

    proc = EngineProcess(EngineSpec(folder, max_batch_size=16, dtype="bfloat16", threads=1), on_message)
    proc.add(token, [(prompt_ids, params), ...])   # answered by on_message(("added", token, rids))
    proc.cancel([rid, ...])                         #   or ("refused", token, message)
    # every step: on_message(("step", updates, running, waiting)); a failed step: ("failed", text);
    # the process gone: ("stopped", text)

on_message runs on a reader thread, in the order the child sent. The child ends on `close()`, or when the pipe
closes because the replica is gone, so it never outlives the replica.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from model.sampling import SamplingParams


class EngineFailure(RuntimeError):
    """A decode step failed in the engine process, or the process is gone: the requests it held fail with it."""


class EngineStopped(EngineFailure):
    """The engine process is gone: it answers nothing more (Ray's health check replaces its replica)."""


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process loads and how it batches."""

    folder: str  # a save_pretrained folder
    max_batch_size: int
    tokenizer_sha256: str | None = None  # checked before the weights are read
    device: str | None = None  # None: CPU
    dtype: str = "auto"  # the weights' dtype in memory (model.engine.DTYPES); auto: as saved
    compile: bool = False
    static: bool = False  # a batch runs to completion (the benchmark's @serve.batch-like baseline)
    threads: int | None = None  # torch threads: the replica's CPUs (engine_client.torch_threads); None: torch's default


class EngineProcess:
    """Starts the engine process (it loads the model; a load error is raised here) and talks to it."""

    def __init__(self, spec: EngineSpec, on_message: Callable[[tuple], None]):
        ctx = mp.get_context("spawn")  # never fork a process that runs threads (Ray's, torch's)
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_main, args=(child, spec), name="quill-engine", daemon=True)
        self.process.start()
        child.close()
        kind, *info = self._recv_or_raise(spec.folder)
        if kind == "error":
            self.process.join(5)
            raise RuntimeError(f"could not load the model from {spec.folder}: {info[0]}")
        self.pid, self.torch_threads, self.dtype, self.model_info = info
        self._send_lock = threading.Lock()
        self._closing = False
        self._on_message = on_message
        self._reader = threading.Thread(target=self._read, name="quill-engine-reader", daemon=True)
        self._reader.start()

    def _recv_or_raise(self, folder: str):
        try:
            return self._conn.recv()
        except EOFError:
            self.process.join(5)
            code = self.process.exitcode
            raise RuntimeError(
                f"the engine process exited (code {code}) while loading the model from {folder}"
            ) from None

    def add(self, token: int, sequences: list[tuple[list[int], SamplingParams]]) -> None:
        """Raises EngineStopped if the engine process is gone."""
        self._send(("add", token, sequences))

    def cancel(self, rids) -> None:
        try:
            self._send(("cancel", list(rids)))
        except EngineStopped:
            pass  # a stopped engine holds nothing to cancel

    def alive(self) -> bool:
        return self.process.is_alive() and self._reader.is_alive()

    def close(self) -> None:
        """Stop the child (it finishes its step and leaves); killed if it has not within 5 s."""
        self._closing = True
        try:
            self._send(("stop",))
        except EngineStopped:
            pass  # already gone
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()

    def _send(self, msg) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError as exc:  # the child is gone (BrokenPipeError) or the pipe was closed
            raise EngineStopped(f"the engine process stopped ({type(exc).__name__})") from None

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                if not self._closing:
                    self.process.join(1)
                    code = self.process.exitcode
                    self._on_message(("stopped", f"the engine process stopped (exit code {code})"))
                return
            self._on_message(msg)


def _main(conn, spec: EngineSpec) -> None:
    """The child: load the model, then take commands between steps and step while there is work."""
    with compile_settings() if spec.compile else contextlib.nullcontext():
        _serve(conn, spec)


@contextlib.contextmanager
def compile_settings():
    """PyTorch's settings for a process that only serves a compiled model."""
    import torch._dynamo.config
    import torch._inductor.config

    # freezing: the weights become constants of the graph (on CPU, prepacked for oneDNN: bfloat16 matmuls of a
    # few rows cost a third less); a graph per kind of step (see warm_up), with room
    with torch._inductor.config.patch(freezing=True), torch._dynamo.config.patch(recompile_limit=16):
        yield


def _serve(conn, spec: EngineSpec) -> None:
    import torch

    from model import Engine, Scheduler

    if spec.threads is not None:  # before the model loads: the replica's CPUs, not every core of the machine
        torch.set_num_threads(spec.threads)
    try:
        engine = Engine.from_pretrained(spec.folder, spec.tokenizer_sha256, spec.device, spec.compile, spec.dtype)
        scheduler = Scheduler(engine, spec.max_batch_size, static=spec.static)
        if spec.compile:
            warm_up(scheduler)
    except Exception as exc:  # a tokenizer hash mismatch, a damaged or missing file: the replica reports it
        traceback.print_exc()
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    info = (engine.config.block_size, engine.config.vocab_size, engine.eos_token_id)
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    conn.send(("ready", os.getpid(), torch.get_num_threads(), dtype, info))
    try:
        while True:
            # block for commands while idle; between steps, take whatever has arrived
            while not scheduler.has_work() or conn.poll(0):
                msg = conn.recv()
                if msg[0] == "stop":
                    return
                _command(msg, scheduler, conn)
            try:
                updates = scheduler.step()
            except Exception as exc:  # a bug or OOM in a step: fail what is in flight, keep serving
                traceback.print_exc()
                scheduler.reset()
                conn.send(("failed", f"{type(exc).__name__}: {exc}"))
                continue
            conn.send(("step", updates, scheduler.num_running, scheduler.num_waiting))
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the replica closed the pipe or is gone


def warm_up(scheduler) -> None:
    """Compile every kind of step serving meets (prefill of one prompt or several, of equal or unequal lengths,
    of one token or more, scoring the prompt or not; decode of one row or several) before the replica says it
    is ready, so that no request waits for a compilation: Ray Serve routes nothing to a replica before its
    constructor returns."""
    t = scheduler.engine.eos_token_id or 0
    greedy = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    echo = SamplingParams(max_tokens=0, echo=True, logprobs=0)
    for params in (greedy, echo):
        for prompts in ([[t, t]], [[t, t, t], [t, t]], [[t, t], [t, t]], [[t]], [[t], [t]]):
            for ids in prompts:
                scheduler.add(ids, params)
            while scheduler.has_work():
                scheduler.step()


def _command(msg, scheduler, conn) -> None:
    kind = msg[0]
    if kind == "cancel":
        for rid in msg[1]:
            scheduler.cancel(rid)
    elif kind == "add":
        _, token, sequences = msg
        rids: list[int] = []
        try:
            for ids, params in sequences:
                rids.append(scheduler.add(ids, params))
        except ValueError as exc:
            for rid in rids:
                scheduler.cancel(rid)
            conn.send(("refused", token, str(exc)))
            return
        conn.send(("added", token, rids, scheduler.num_running, scheduler.num_waiting))
