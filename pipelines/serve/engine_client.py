"""The replica's side of its engine process (engine_process.py): it starts the process, pumps every step's updates
from the pipe onto the asyncio queue of the request each belongs to, and keeps the books: what is in flight, what
the replica may still take, what fails when the engine does, the counters /stats reports.

    engine = EngineClient(engine_spec(folder, params), params.max_ongoing_requests)
    request = await engine.submit([prompt_ids], sampling_params, n=2)   # Busy, Refused, EngineFailure
    async for batch in engine.updates(request):     # [(choice index, RowUpdate), ...] until every choice ended
        ...                                         # leaving early cancels the rest in the scheduler
    engine.close()

It knows nothing of HTTP: the OpenAI layer (responses.openai_error) turns its exceptions into status codes. The
reader thread hands each message to the event loop requests are submitted on, so the books need no lock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from model import SamplingParams
from model.scheduler import RowUpdate
from model.sequence import Completion
from pipelines.common.params import ServeParams
from pipelines.serve import metrics
from pipelines.serve.engine_process import EngineFailure, EngineProcess, EngineSpec, EngineStopped

log = logging.getLogger("ray.serve")  # the replica's log under Ray Serve; a plain logger elsewhere


def torch_threads(num_cpus: float) -> int:
    """Torch threads for the engine process of a replica granted `num_cpus` CPUs (serve.num_cpus_per_replica):
    the whole CPUs, at least one (Ray's rule for an actor's OMP_NUM_THREADS, which Ray skips when the variable is
    already in its environment: so the engine process sets its threads itself).

    >>> torch_threads(0.5), torch_threads(1), torch_threads(2.5)
    (1, 1, 2)
    """
    return max(1, math.floor(num_cpus))


def engine_spec(
    folder: Path, params: ServeParams, tokenizer_sha256: str | None = None, static: bool = False
) -> EngineSpec:
    """What the engine process of a replica with these settings loads, and how it runs."""
    return EngineSpec(
        str(folder),
        params.max_batch_size,
        tokenizer_sha256=tokenizer_sha256,
        device="cuda" if params.num_gpus_per_replica > 0 else None,  # Ray sets CUDA_VISIBLE_DEVICES
        dtype=params.dtype,
        compile=params.compile,
        static=static,
        threads=torch_threads(params.num_cpus_per_replica),
    )


class Busy(Exception):
    """The replica holds as many sequences as it takes (serve.max_ongoing_requests): retry later."""

    def __init__(self, held: int, limit: int):
        super().__init__(f"this replica holds {held} sequences and takes at most {limit}")


class Refused(ValueError):
    """The scheduler refused a request; the message names the parameter first ("max_tokens must be ...")."""


@dataclass(frozen=True)
class Request:
    """A request's sequences in the engine: their updates arrive on `queue`; `choices` maps engine id -> choice."""

    queue: asyncio.Queue
    choices: dict[int, int]


class EngineClient:
    """Starts the engine process (a load error is raised here) and serves requests through it."""

    def __init__(self, spec: EngineSpec, max_ongoing_requests: int):
        self.max_batch_size = spec.max_batch_size
        self.max_ongoing_requests = max_ongoing_requests  # sequences, running + waiting (n counts n times)
        self._queues: dict[int, asyncio.Queue] = {}  # by engine id, from its add's answer to its last update
        self._timing: dict[int, metrics.Timing] = {}
        # adds the engine has not answered yet: their future, queue and timings, by token
        self._pending: dict[int, tuple[asyncio.Future, asyncio.Queue, list[metrics.Timing]]] = {}
        self._tokens = itertools.count()
        self.running = self.waiting = 0  # the engine's last report
        self.cancelled = 0  # sequences dropped because their caller went away
        self.generated = 0  # tokens generated
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop requests are submitted on
        self.process = EngineProcess(spec, self._from_engine)  # last: its reader thread calls _from_engine

    def alive(self) -> bool:
        return self.process.alive()

    def close(self) -> None:
        self.process.close()

    # -- requests --------------------------------------------------------------------------------
    async def submit(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> Request:
        """Queue n sequences per prompt in the engine (sample j of n seeded with seed + j). Raises Busy past
        max_ongoing_requests, Refused for what the scheduler refuses, EngineStopped once the engine is gone."""
        self._loop = asyncio.get_running_loop()
        if not self.process.alive():
            raise EngineStopped("the engine process stopped; the replica restarts")
        wanted = len(prompts) * n
        held = len(self._queues) + sum(len(timings) for _, _, timings in self._pending.values())
        if held + wanted > self.max_ongoing_requests:
            raise Busy(held, self.max_ongoing_requests)
        q: asyncio.Queue = asyncio.Queue()
        sequences = []
        for p in prompts:
            for j in range(n):
                seed = None if params.seed is None else params.seed + j  # n samples, n different seeds
                sequences.append((p, replace(params, seed=seed)))
        token = next(self._tokens)
        fut = self._loop.create_future()
        self._pending[token] = (fut, q, [metrics.Timing() for _ in sequences])
        try:
            self.process.add(token, sequences)
        except EngineStopped as exc:
            del self._pending[token]
            raise EngineStopped(f"{exc}; the replica restarts") from None
        rids = await fut
        return Request(q, {rid: i for i, rid in enumerate(rids)})

    async def updates(self, request: Request) -> AsyncIterator[list[tuple[int, RowUpdate]]]:
        """Lists of (choice index, update), each everything the queue held (at least one), until every sequence
        finished; the sequences left are cancelled if the caller goes away. After an engine failure the tokens
        made before it come first, then EngineFailure."""
        remaining = set(request.choices)
        try:
            while remaining:
                batch = [await request.queue.get()]
                while not request.queue.empty():
                    batch.append(request.queue.get_nowait())
                out, failure = [], None
                for u in batch:
                    if isinstance(u, EngineFailure):
                        failure = u
                        break
                    if u.completion is not None:
                        remaining.discard(u.rid)
                        self._queues.pop(u.rid, None)
                    out.append((request.choices[u.rid], u))
                if out:
                    yield out
                if failure is not None:
                    remaining.clear()  # the engine dropped them: nothing to cancel, not cancelled by a caller
                    raise EngineFailure(f"generation failed: {failure}")
        finally:
            if remaining:
                self.cancelled += len(remaining)
                metrics.CANCELLED.inc(len(remaining))
                self._forget(remaining)

    async def completions(self, request: Request) -> list[Completion]:
        """Every choice's completion, by choice index."""
        done: list[Completion | None] = [None] * len(request.choices)
        async for batch in self.updates(request):
            for i, u in batch:
                if u.completion is not None:
                    done[i] = u.completion
        return done

    def stats(self) -> dict:
        """The scheduler's occupancy, the counters, and what the engine runs with (the same numbers are
        Prometheus gauges and counters)."""
        stats = {
            "running": self.running,
            "waiting": self.waiting,
            "max_batch_size": self.max_batch_size,
            "cancelled": self.cancelled,
            "generated_tokens": self.generated,  # since start: the benchmark's server-side tokens/s
            "torch_threads": self.process.torch_threads,
            "dtype": self.process.dtype,  # the weights' dtype in memory (serve.dtype)
            "engine_pid": self.process.pid,  # the process that holds the model
        }
        own, engine = _memory(os.getpid()), _memory(self.process.pid)
        stats["rss_bytes"] = own[0] + engine[0]  # the benchmark checks for leaks
        stats["pss_bytes"] = own[1] + engine[1]
        return stats

    def _forget(self, rids) -> None:
        self.process.cancel(rids)
        for rid in rids:
            self._queues.pop(rid, None)
            self._timing.pop(rid, None)

    # -- the message pump ------------------------------------------------------------------------
    def _from_engine(self, msg: tuple) -> None:
        """On the reader thread: every message goes to the event loop, in order."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._handle, msg)

    def _handle(self, msg: tuple) -> None:
        try:
            self._dispatch(msg)
        except Exception:  # a fault here must not leave requests waiting for tokens that never come
            log.exception("quill: handling the engine's %r message failed", msg[0])
            self._fail_everything(f"the replica lost the engine's {msg[0]!r} message")

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            self._deliver(*msg[1:])
        elif kind == "added":
            _, token, rids, self.running, self.waiting = msg
            pending = self._pending.pop(token, None)
            if pending is None:  # given up on (_fail_everything): free the rows the engine just gave it
                self.process.cancel(rids)
                return
            fut, q, timings = pending
            for rid, timing in zip(rids, timings):  # registered before any of their tokens can be delivered
                self._queues[rid], self._timing[rid] = q, timing
            if not fut.done():
                fut.set_result(rids)
            else:  # the caller went away while waiting
                self._forget(rids)
        elif kind == "refused":
            _, token, message = msg
            fut, _, _ = self._pending.pop(token, (None, None, None))
            if fut is not None and not fut.done():
                fut.set_exception(Refused(message))
        elif kind == "failed":  # a step failed; the engine dropped what it held and goes on
            self._fail_running(EngineFailure(msg[1]))
        elif kind == "stopped":  # the engine process is gone: nothing in flight will be answered
            self._fail_running(EngineFailure(msg[1]))
            self._fail_pending(EngineStopped(msg[1]))
        else:
            raise ValueError(f"unknown message from the engine process: {kind!r}")

    def _fail_running(self, exc: EngineFailure) -> None:
        """Fail every request the engine had taken (adds it has not answered yet are still answered after the
        failure)."""
        metrics.ERRORS.inc(tags={"kind": "engine"})
        for q in set(self._queues.values()):
            q.put_nowait(exc)
        self._queues.clear()
        self._timing.clear()

    def _fail_pending(self, exc: EngineFailure) -> None:
        """Fail every add the engine has not answered yet."""
        for fut, _, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    def _fail_everything(self, reason: str) -> None:
        """After a fault in this side's own handling: every request in flight fails (a stream with an error
        event) and the engine drops their rows; the replica serves on."""
        rids = list(self._queues)
        self._fail_running(EngineFailure(reason))
        self._fail_pending(EngineFailure(f"{reason}; retry"))
        self.process.cancel(rids)

    def _deliver(self, updates: list[RowUpdate], running: int, waiting: int) -> None:
        """One step's tokens to their requests' queues, and the metrics."""
        self.running, self.waiting = running, waiting
        metrics.RUNNING.set(running)
        metrics.QUEUE_LENGTH.set(waiting)
        for u in updates:
            q = self._queues.get(u.rid)
            if q is not None:
                q.put_nowait(u)
            try:
                self._observe(u)
            except Exception:  # metrics must never stop the pump
                log.exception("quill: recording metrics failed")

    def _observe(self, u: RowUpdate) -> None:
        self.generated += u.chunk.token_id is not None
        timing = self._timing.get(u.rid)
        if timing is None:
            return
        if u.chunk.token_id is not None:
            timing.token()
        if u.completion is not None:
            timing.done(len(u.completion.token_ids))
            del self._timing[u.rid]


def _memory(pid: int) -> tuple[int, int]:
    """(resident, proportional) bytes of a process: PSS charges a shared page (torch's libraries, mapped by the
    replica and its engine process alike) to each process by its share, so the two add up."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except psutil.NoSuchProcess:
        return 0, 0
    return info.rss, getattr(info, "pss", info.rss)  # PSS exists on Linux only
