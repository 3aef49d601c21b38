"""The replica's engine process (pipelines/serve/engine_process.py): the scheduler stepping in a child process
answers adds, streams steps, honours cancels, refuses what the scheduler refuses, reports a failed load with
its cause, and never outlives the pipe to its replica."""

from __future__ import annotations

import queue
import time

import pytest
import torch
from torch._dynamo.utils import counters

from model import Engine, SamplingParams, Scheduler
from pipelines.serve.engine_process import EngineFailure, EngineProcess, EngineSpec, compile_settings, warm_up
from tests.helpers.serving import tiny_model_folder

GREEDY = dict(temperature=0.0, ignore_eos=True)


class Inbox:
    """What the reader thread hands over, as a queue the test reads with a deadline."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def __call__(self, msg: tuple) -> None:
        self.q.put(msg)

    def next(self, kind: str, timeout: float = 60) -> tuple:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.q.get(timeout=left)
            if msg[0] == kind:
                return msg
        raise AssertionError(f"no {kind!r} message within {timeout} s")

    def completions(self, rids, timeout: float = 60) -> dict:
        done, deadline = {}, time.monotonic() + timeout
        while set(done) != set(rids):
            _, updates, _, _ = self.next("step", deadline - time.monotonic())
            done.update({u.rid: u.completion for u in updates if u.completion is not None})
        return done


def start(folder, inbox, sha256=None, max_batch_size=4) -> EngineProcess:
    return EngineProcess(EngineSpec(str(folder), max_batch_size, sha256), inbox)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("engine_process"), seed=0)


@pytest.fixture(scope="module")
def running(folder):
    inbox = Inbox()
    proc = start(folder, inbox)
    yield proc, inbox
    proc.close()


def test_greedy_completions_equal_the_engine_in_this_process(running, folder):
    proc, inbox = running
    prompts = [[5, 6, 7], [8, 9]]
    proc.add(1, [(p, SamplingParams(max_tokens=12, **GREEDY)) for p in prompts])
    _, token, rids, _, _ = inbox.next("added")
    assert token == 1 and len(rids) == 2
    done = inbox.completions(rids)
    engine = Engine.from_pretrained(folder)
    offline = engine.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))
    assert [done[r].token_ids for r in rids] == [c.token_ids for c in offline]
    assert proc.model_info == (engine.config.block_size, engine.config.vocab_size, engine.eos_token_id)


def test_a_prompt_beyond_the_context_is_refused_with_the_schedulers_reason(running):
    proc, inbox = running
    proc.add(2, [([5], SamplingParams(max_tokens=4, **GREEDY)), ([5] * 1000, SamplingParams(max_tokens=100))])
    _, token, message = inbox.next("refused")
    assert token == 2 and "max_tokens" in message and "context" in message, message
    _, _, running_rows, waiting = inbox.next("step", 10)
    assert (running_rows, waiting) == (0, 0)  # the half-added request was dropped with it


def test_cancel_frees_the_row(running):
    proc, inbox = running
    proc.add(3, [([5, 6], SamplingParams(max_tokens=900, **GREEDY))])
    _, _, [rid], _, _ = inbox.next("added")
    inbox.next("step")
    proc.cancel([rid])
    deadline = time.monotonic() + 30
    while True:
        _, updates, running_rows, _ = inbox.next("step", deadline - time.monotonic())
        assert all(u.completion is None for u in updates if u.rid == rid)
        if running_rows == 0:
            break
    assert proc.alive()


def test_the_engine_holds_the_weights_in_the_dtype_asked_for(running, folder):
    proc, _ = running
    assert proc.dtype == "float32"  # auto: as saved
    inbox = Inbox()
    half = EngineProcess(EngineSpec(str(folder), 2, dtype="bfloat16"), inbox)
    try:
        assert half.dtype == "bfloat16"
        prompts = [[5, 6, 7], [8, 9]]
        half.add(1, [(p, SamplingParams(max_tokens=6, **GREEDY)) for p in prompts])
        _, _, rids, _, _ = inbox.next("added")
        done = inbox.completions(rids)
        # the same scheduler in this process (bfloat16 rounds differently wherever the computation differs)
        offline = Scheduler(Engine.from_pretrained(folder, dtype="bfloat16"), max_batch_size=2)
        ids = [offline.add(p, SamplingParams(max_tokens=6, **GREEDY)) for p in prompts]
        ref = {}
        while offline.has_work():
            ref.update({u.rid: u.completion for u in offline.step() if u.completion is not None})
        assert [done[r].token_ids for r in rids] == [ref[i].token_ids for i in ids]
    finally:
        half.close()


def test_a_tokenizer_hash_mismatch_fails_the_start_and_names_the_folder(folder):
    with pytest.raises(RuntimeError, match="could not load the model from .*tokenizer"):
        start(folder, Inbox(), sha256="0" * 64)


def test_the_child_ends_with_its_pipe_and_a_killed_child_fails_the_requests(folder):
    inbox = Inbox()
    proc = start(folder, inbox)
    proc.process.kill()
    _, reason = inbox.next("stopped", 30)
    assert "engine process stopped" in reason and not proc.alive()
    proc.cancel([0])  # nothing to cancel in a stopped engine: no error
    with pytest.raises(EngineFailure, match="engine process stopped"):
        proc.add(9, [([5], SamplingParams(max_tokens=1))])

    proc = start(folder, Inbox())
    proc.close()
    assert proc.process.exitcode == 0  # left its loop when the pipe closed, not killed


def test_a_failed_step_fails_what_it_held_and_the_engine_serves_on(running):
    proc, inbox = running
    poisoned = SamplingParams(max_tokens=5, temperature=1.0)
    object.__setattr__(poisoned, "logit_bias", {5: float("nan")})  # past validation: a step that raises
    proc.add(4, [([5, 6], poisoned)])
    _, _, [failed], _, _ = inbox.next("added")
    _, reason = inbox.next("failed")
    assert "RuntimeError" in reason, reason
    proc.add(5, [([5, 6], SamplingParams(max_tokens=3, **GREEDY))])
    _, _, rids, _, _ = inbox.next("added")
    assert rids[0] > failed  # a late cancel of the failed request cannot name the new one
    assert len(inbox.completions(rids)[rids[0]].token_ids) == 3 and proc.alive()


def test_a_warmed_up_compiled_engine_compiles_nothing_while_serving(folder):
    """serve.compile: the warm-up compiles every kind of step before the replica is ready."""
    torch._dynamo.reset()
    try:
        with compile_settings():
            engine = Engine.from_pretrained(folder, compile=True)
            scheduler = Scheduler(engine, max_batch_size=4)
            warm_up(scheduler)
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 4  # prefill and decode, one row and several
            greedy = SamplingParams(max_tokens=6, **GREEDY)
            rids = [scheduler.add([5, 6, 7], greedy), scheduler.add([8], SamplingParams(max_tokens=9, seed=1))]
            scheduler.add([9, 10, 11, 12], SamplingParams(max_tokens=0, echo=True, logprobs=2))
            done, steps = {}, 0
            while scheduler.has_work():
                if steps == 2:  # requests joining a running batch, of equal and of unequal lengths
                    rids += [scheduler.add(p, greedy) for p in ([5, 6], [7, 8], [9])]
                done.update({u.rid: u.completion for u in scheduler.step() if u.completion is not None})
                steps += 1
            assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()
    eager = Engine.from_pretrained(folder).generate([[5, 6, 7]], greedy)[0]
    assert done[rids[0]].token_ids == eager.token_ids
