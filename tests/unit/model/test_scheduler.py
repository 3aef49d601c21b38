"""Continuous batching (model/scheduler.py): rows in a shared batch behave as if they ran alone, short requests
overtake long ones, cancelled requests free their rows, and each row keeps its own sampling parameters."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model import GPT, Engine, GPTConfig, SamplingParams
from model.scheduler import Scheduler
from tests.helpers.generation import PENALTY_CASES, TOP_TWO, A, C, fixed_logits_engine
from tests.helpers.tokenizers import byte_bpe

TEXT = [
    "To be, or not to be, that is the question.",
    "All the world's a stage, and all the men and women merely players.",
    "Émoji 🙂 and 中文 text; naïve café.",
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    tok = byte_bpe(TEXT * 3)
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(), block_size=64, n_embd=32)
    return Engine(GPT(cfg).eval(), tok)


def run_all(sched: Scheduler, steps: int | None = None, done: dict | None = None) -> tuple[dict, list[int]]:
    """Step until idle, or `steps` times: completions by request id (added to `done`), ids in finishing order."""
    done = {} if done is None else done
    order = []
    taken = 0
    while sched.has_work() and (steps is None or taken < steps):
        taken += 1
        for u in sched.step():
            if u.completion is not None:
                done[u.rid] = u.completion
                order.append(u.rid)
    return done, order


GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_greedy_rows_in_a_mixed_batch_match_the_engine_alone(engine):
    prompts = ["To be", "All the world's a stage, and all the", "Émoji", "question"]
    max_tokens = [30, 12, 45, 5]
    sched = Scheduler(engine, max_batch_size=3)  # fewer rows than requests: one waits for a free row
    rids = [sched.add(p, SamplingParams(max_tokens=m, **GREEDY)) for p, m in zip(prompts, max_tokens)]
    done, _ = run_all(sched)
    for rid, p, m in zip(rids, prompts, max_tokens):
        [alone] = engine.generate([p], SamplingParams(max_tokens=m, **GREEDY))
        assert done[rid].token_ids == alone.token_ids
        assert done[rid].text == alone.text


class ShiftCounting(Scheduler):
    """Records how the cache window moved, so a test can check it exercised both directions."""

    def _shift(self, d: int) -> None:
        self.shifts = [*getattr(self, "shifts", []), d]
        super()._shift(d)


def test_rows_survive_the_window_moving_both_ways(engine):
    # a long prompt joining a young row moves the window right; rows near the 64-token context move it left
    long_prompt = "Émoji 🙂 and 中文 text; naïve café. To be, or not to be"
    cases = [("To be", 60), (long_prompt, 20), ("All the world's a stage", 50)]
    sched = ShiftCounting(engine, max_batch_size=2)
    rids = [sched.add(cases[0][0], SamplingParams(max_tokens=cases[0][1], **GREEDY))]
    sched.step()
    rids.append(sched.add(cases[1][0], SamplingParams(max_tokens=cases[1][1], **GREEDY)))
    done, _ = run_all(sched, steps=20)
    rids.append(sched.add(cases[2][0], SamplingParams(max_tokens=cases[2][1], **GREEDY)))
    run_all(sched, done=done)
    assert min(sched.shifts) < 0 < max(sched.shifts)
    for rid, (p, m) in zip(rids, cases):
        [alone] = engine.generate([p], SamplingParams(max_tokens=m, **GREEDY))
        assert done[rid].token_ids == alone.token_ids


class WindowRecording(Scheduler):
    """Records where attention started in each decode step."""

    def _decode(self):
        updates = super()._decode()
        self.firsts = [*getattr(self, "firsts", []), self.cache.first]
        return updates


def test_attention_skips_the_columns_of_retired_rows_and_rows_still_match(engine):
    # the long prompt's row retires early; the young rows then need only the last few columns
    long_prompt = "Émoji 🙂 and 中文 text; naïve café. To be, or not to be, that is the question."
    cases = [(long_prompt, 3), ("All the world's a stage", 25), ("To be", 20)]
    sched = WindowRecording(engine, max_batch_size=3)
    rids = [sched.add(p, SamplingParams(max_tokens=m, logprobs=0, **GREEDY)) for p, m in cases]
    done, _ = run_all(sched)
    gap = len(engine.encode(long_prompt)) - len(engine.encode(cases[1][0]))
    assert max(sched.firsts) >= gap  # the window left the long row's columns
    for rid, (p, m) in zip(rids, cases):
        [alone] = engine.generate([p], SamplingParams(max_tokens=m, logprobs=0, **GREEDY))
        assert done[rid].token_ids == alone.token_ids
        got, want = [x.logprob for x in done[rid].logprobs], [x.logprob for x in alone.logprobs]
        assert got == pytest.approx(want, abs=1e-4)  # every column a row needs was read


def test_short_request_admitted_while_a_long_one_runs_finishes_first(engine):
    sched = Scheduler(engine, max_batch_size=4)
    long = sched.add("To be", SamplingParams(max_tokens=50, **GREEDY))
    for _ in range(3):
        sched.step()
    short = sched.add("All the", SamplingParams(max_tokens=4, **GREEDY))
    done, order = run_all(sched)
    assert order == [short, long]
    assert len(done[short].token_ids) == 4 and len(done[long].token_ids) == 50


def test_static_batching_makes_the_short_request_wait(engine):
    sched = Scheduler(engine, max_batch_size=4, static=True)
    long = sched.add("To be", SamplingParams(max_tokens=30, **GREEDY))
    sched.step()
    short = sched.add("All the", SamplingParams(max_tokens=4, **GREEDY))
    _, order = run_all(sched)
    assert order == [long, short]


def test_cancel_frees_the_row_at_the_next_step(engine):
    sched = Scheduler(engine, max_batch_size=2)
    a = sched.add("To be", SamplingParams(max_tokens=40, **GREEDY))
    b = sched.add("All the", SamplingParams(max_tokens=40, **GREEDY))
    sched.step()
    assert sched.num_running == 2
    sched.cancel(a)
    updates = sched.step()
    assert sched.num_running == 1 and {u.rid for u in updates} == {b}
    waiting = sched.add("question", SamplingParams(max_tokens=3, **GREEDY))
    sched.cancel(waiting)  # cancelled before it ever ran
    sched.step()
    assert sched.num_waiting == 0 and sched.num_running == 1
    done, _ = run_all(sched)
    [alone] = engine.generate(["All the"], SamplingParams(max_tokens=40, **GREEDY))
    assert set(done) == {b} and done[b].token_ids == alone.token_ids


def test_reset_drops_every_request_and_ids_keep_counting(engine):
    sched = Scheduler(engine, max_batch_size=1)
    old = [sched.add(p, SamplingParams(max_tokens=40, **GREEDY)) for p in ("To be", "All the")]
    sched.step()
    assert sched.num_running == 1 and sched.num_waiting == 1
    sched.reset()
    assert not sched.has_work()
    new = sched.add("question", SamplingParams(max_tokens=5, **GREEDY))
    assert new not in old
    sched.cancel(old[0])  # a late cancel for an id from before names nothing now
    done, _ = run_all(sched)
    [alone] = engine.generate(["question"], SamplingParams(max_tokens=5, **GREEDY))
    assert set(done) == {new} and done[new].token_ids == alone.token_ids


def test_each_row_keeps_its_own_sampling_parameters(engine):
    sched = Scheduler(engine, max_batch_size=4)
    specs = [
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.8, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.5, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=1.2, top_k=5, seed=3, presence_penalty=1.0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True),
    ]
    rids = [sched.add("To be, or", p) for p in specs]
    done, _ = run_all(sched)
    for rid, p in zip(rids, specs):
        [alone] = engine.generate(["To be, or"], p)  # seeded sampling is reproducible row by row
        assert done[rid].token_ids == alone.token_ids
    # the penalties change those rows, so the comparison would fail if both paths ignored them
    for i, off in ((1, dict(repetition_penalty=1.0)), (2, dict(presence_penalty=0.0))):
        [unpenalised] = engine.generate(["To be, or"], replace(specs[i], **off))
        assert done[rids[i]].token_ids != unpenalised.token_ids, specs[i]
    lp = done[rids[3]].logprobs
    assert len(lp) == 12 and all(len(x.top) == 3 for x in lp)
    [alone] = engine.generate(["To be, or"], specs[3])
    assert [x.logprob for x in lp] == pytest.approx([x.logprob for x in alone.logprobs], abs=1e-4)


def test_logit_bias_forces_and_bans_tokens(engine):
    sched = Scheduler(engine, max_batch_size=2)
    [plain] = engine.generate(["To be"], SamplingParams(max_tokens=6, **GREEDY))
    forced = sched.add("To be", SamplingParams(max_tokens=6, logit_bias={42: 100}, **GREEDY))
    banned = sched.add("To be", SamplingParams(max_tokens=6, logit_bias={plain.token_ids[0]: -100}, **GREEDY))
    done, _ = run_all(sched)
    assert done[forced].token_ids == [42] * 6
    assert done[banned].token_ids[0] != plain.token_ids[0]
    with pytest.raises(ValueError, match="logit_bias"):
        sched.add("To be", SamplingParams(max_tokens=2, logit_bias={10_000: 1.0}))


def test_stop_strings_echo_and_streaming_text(engine):
    sched = Scheduler(engine, max_batch_size=2)
    p = SamplingParams(max_tokens=30, temperature=0.0, stop=["e"], ignore_eos=True)
    rid = sched.add("Émoji 🙂", p)
    echo = sched.add("To be, or not", SamplingParams(max_tokens=0, echo=True, logprobs=2))
    streamed = {rid: "", echo: ""}
    done = {}
    while sched.has_work():
        for u in sched.step():
            streamed[u.rid] += u.chunk.text
            if u.completion:
                done[u.rid] = u.completion
    [alone] = engine.generate(["Émoji 🙂"], p)
    assert done[rid].text == alone.text == streamed[rid]
    assert "e" not in done[rid].text
    [ref] = engine.generate(["To be, or not"], SamplingParams(max_tokens=0, echo=True, logprobs=2))
    got = done[echo].prompt_logprobs
    assert done[echo].token_ids == [] and len(got) == len(ref.prompt_logprobs)
    assert [x.logprob for x in got[1:]] == pytest.approx([x.logprob for x in ref.prompt_logprobs[1:]], abs=1e-4)


def test_requests_that_cannot_run_are_refused_when_added(engine):
    sched = Scheduler(engine, max_batch_size=2)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        sched.add("To be", SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="outside"):
        sched.add([1, 10_000], SamplingParams(max_tokens=2))
    assert not sched.has_work()


def test_seeded_rows_sharing_a_batched_distribution_match_the_engine_alone(engine):
    # all rows draw together; a seeded row with uniforms from its own stream, the unseeded ones from a shared one
    sched = Scheduler(engine, max_batch_size=6)
    shared = dict(max_tokens=15, temperature=0.9, top_k=20, top_p=0.9, ignore_eos=True)
    prompts = ["To be, or", "All the world's", "Émoji", "question"]
    seeded = [sched.add(p, SamplingParams(seed=s, **shared)) for s, p in enumerate(prompts)]
    unseeded = [sched.add("To be", SamplingParams(**shared)) for _ in range(2)]  # the scheduler's stream
    done, _ = run_all(sched)
    for s, (rid, p) in enumerate(zip(seeded, prompts)):
        [alone] = engine.generate([p], SamplingParams(seed=s, **shared))
        assert done[rid].token_ids == alone.token_ids
    assert all(len(done[rid].token_ids) == 15 for rid in unseeded)


def test_prefill_is_capped_per_step_and_rows_still_match(engine):
    long_prompt = "All the world's a stage, and all the men and women merely players."
    n = len(engine.encode(long_prompt))
    sched = Scheduler(engine, max_batch_size=4, max_prefill_tokens=n)  # one long prompt per step
    running = sched.add("To be", SamplingParams(max_tokens=10, **GREEDY))
    sched.step()
    rids = [sched.add(long_prompt, SamplingParams(max_tokens=5, **GREEDY)) for _ in range(3)]
    admitted = []
    for _ in range(3):
        sched.step()
        admitted.append(sched.num_running)
    assert admitted == [2, 3, 4]  # the running row decoded at every step while the prompts came in one by one
    done, _ = run_all(sched)
    [alone] = engine.generate([long_prompt], SamplingParams(max_tokens=5, **GREEDY))
    assert all(done[rid].token_ids == alone.token_ids for rid in rids) and len(done[running].token_ids) == 10


# the hand-worked penalty cases of tests/helpers/generation.py, on model/conftest.py's tokenizer
def test_scheduler_rows_apply_their_own_penalties_and_filters(tokenizer):
    """The same hand-worked cases as rows of one continuous batch, each with its own parameters."""
    engine = fixed_logits_engine(tokenizer, TOP_TWO)
    sched = Scheduler(engine, max_batch_size=8)
    cases = [(p, penalty, tokens) for logits, p, penalty, tokens in PENALTY_CASES if logits is TOP_TWO]
    rids = [sched.add(p, SamplingParams(max_tokens=6, **penalty, **GREEDY)) for p, penalty, _ in cases]
    # p(A, B) = softmax(5, 4) = (0.73, 0.27): top_p 0.7 keeps A alone
    nucleus = sched.add([C], SamplingParams(max_tokens=6, temperature=1.0, top_p=0.7, seed=0, ignore_eos=True))
    done = {}
    while sched.has_work():
        for u in sched.step():
            if u.completion is not None:
                done[u.rid] = u.completion
    assert [done[rid].token_ids for rid in rids] == [tokens for _, _, tokens in cases]
    assert done[nucleus].token_ids == [A] * 6
