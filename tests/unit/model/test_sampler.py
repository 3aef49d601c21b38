"""The sort-free sampler (model/sampler.py): it keeps exactly the tokens Hugging Face's TopK, TopP and MinP warpers keep
(equal logits included), draws from them with their probabilities, and a seeded row draws the same tokens whatever
else is in its batch."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from tokenizers import Tokenizer, models, pre_tokenizers

from model import GPT, Engine, GPTConfig, SamplingParams
from model.sampler import SamplingRows, kept_mask, sample
from model.scheduler import Scheduler
from tests.helpers.sampling import batches, hf_warped


def hf_kept(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    return torch.cat([hf_warped(logits[r : r + 1], p) for r, p in enumerate(params)]) > float("-inf")


@settings(max_examples=300, deadline=None)
@given(batches())
def test_kept_sets_equal_hugging_faces_warpers(batch):
    logits, params = batch  # each row with its own controls, as in a continuous batch
    assert torch.equal(kept_mask(logits, SamplingRows.of(params, "cpu")), hf_kept(logits, params))


def test_thresholds_exactly_at_a_cut_fall_as_hugging_faces_do():
    # top_p equal to the mass of the top k tokens, min_p equal to a ratio of two probabilities: float rounding
    # decides (in HF too), so the sampler must hand these to HF's own code rather than round its own way
    for weights in itertools.permutations([7.0, 2.0, 1.0, 3.0, 5.0], 4):
        w = torch.tensor(weights, dtype=torch.float64)
        logits, top = w.log().float()[None], w.sort(descending=True).values
        for k in (1, 2, 3):
            for p in (
                SamplingParams(top_p=float(top[:k].sum() / w.sum())),
                SamplingParams(min_p=float(top[k] / top[0])),
            ):
                assert torch.equal(kept_mask(logits, SamplingRows.of([p], "cpu")), hf_kept(logits, [p])), (weights, p)


def test_a_large_vocabulary_keeps_hugging_faces_sets():
    # a model's vocabulary and the served settings: flat (random init) to peaked rows
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4096, generator=g) * torch.tensor([0.25, 1.0, 3.0, 8.0]).repeat(2)[:, None]
    for p in (
        SamplingParams(temperature=0.8, top_p=0.95),
        SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.0, min_p=0.1),
    ):
        assert torch.equal(kept_mask(logits, SamplingRows.of([p] * 8, "cpu")), hf_kept(logits, [p] * 8))


# -- the draws -----------------------------------------------------------------------------------------------------
DRAW_LOGITS = torch.tensor([2.0, 1.0, 1.0, 0.5, 0.0, -1.0, -1.0, -3.0])
DRAW_CASES = {
    "unfiltered": SamplingParams(temperature=1.0),
    "top_p": SamplingParams(temperature=1.0, top_p=0.8),
    "top_p-splits-a-tie": SamplingParams(temperature=1.0, top_p=0.6),  # 2.0 holds 0.45, each 1.0 0.17
    "top_k-keeps-ties": SamplingParams(temperature=0.7, top_k=2),  # the k-th logit is tied: both 1.0 stay
    "min_p": SamplingParams(temperature=1.0, min_p=0.3),
    "all": SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("params", DRAW_CASES.values(), ids=DRAW_CASES.keys())
def test_draws_follow_the_kept_distribution(params):
    n = 20_000
    tokens = sample(DRAW_LOGITS.expand(n, -1), SamplingRows.of([params] * n, "cpu"), uniforms([random.Random(0)] * n))
    freq = torch.bincount(tokens, minlength=len(DRAW_LOGITS)).double() / n
    # a split tie: HF keeps 2.0 and the one 1.0 its sort puts last; the sampler keeps that one too, in every row
    expected = hf_warped(DRAW_LOGITS[None], params)[0].softmax(-1).double()
    assert torch.all(freq[expected == 0] == 0)  # never a dropped token
    sigma = (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-9), (freq, expected)


def test_the_uniform_picks_the_token_by_inverse_cdf():
    # u = 0 gives the first kept token in vocabulary order, u just below 1 the last (never one outside the set)
    logits = torch.tensor([[0.0, 3.0, -50.0, 2.5, 3.0, -60.0]])
    params = SamplingRows.of([SamplingParams(temperature=1.0, top_p=0.9)], "cpu")
    kept = kept_mask(logits, params)[0].nonzero()[:, 0].tolist()
    assert kept == [1, 3, 4]
    assert sample(logits, params, lambda idx: [0.0] * len(idx)).tolist() == [1]
    assert sample(logits, params, lambda idx: [1 - 2**-53] * len(idx)).tolist() == [4]


def uniforms(streams: list[random.Random]):
    """The sampler's source of uniforms: row i draws from streams[i]."""
    return lambda idx: [streams[i].random() for i in idx]


def test_a_rows_tokens_do_not_depend_on_the_other_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 1000, generator=g) * torch.linspace(0.2, 6, 16)[:, None]
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
        for t, k, p, m in zip([0.8, 1.0, 0.5, 1.3] * 4, [0, 0, 40, 5] * 4, [0.95, 0.5, 1.0, 0.9] * 4, [0, 0.05] * 8)
    ]
    together_streams = [random.Random(s) for s in range(16)]
    alone_streams = [[random.Random(s)] for s in range(16)]
    for step in range(5):  # the streams go on across steps, as in decoding
        together = sample(logits, SamplingRows.of(params, "cpu"), uniforms(together_streams))
        for r in range(16):
            alone = sample(logits[r : r + 1], SamplingRows.of([params[r]], "cpu"), uniforms(alone_streams[r]))
            assert alone.item() == together[r].item()
        logits = logits.roll(step + 1, dims=1)


# -- in the engine and the scheduler -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine() -> Engine:
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 512)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", vocab_size=len(vocab), block_size=64, n_embd=32)
    return Engine(GPT(cfg).eval(), tok)


def run(sched: Scheduler) -> dict:
    done = {}
    while sched.has_work():
        for u in sched.step():
            if u.completion is not None:
                done[u.rid] = u.completion
    return done


def test_a_seeded_request_draws_the_same_alone_and_in_a_batch_of_15(engine):
    request = ([5, 17, 3], SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=1234, ignore_eos=True))
    others = [
        ([7] * (1 + i % 5), SamplingParams(max_tokens=10 + i, ignore_eos=True, **kw))
        for i, kw in enumerate(
            [
                dict(temperature=0.8, top_p=0.95, seed=s)
                for s in range(6)  # the same controls, other seeds
            ]
            + [
                dict(temperature=1.0),
                dict(temperature=0.8, top_p=0.95),  # unseeded: the scheduler's shared stream
                dict(temperature=0.0),
                dict(temperature=0.0, repetition_penalty=1.3),
                dict(temperature=1.2, top_k=5, seed=9),
                dict(temperature=0.7, min_p=0.1, seed=10),
                dict(temperature=1.0, top_p=0.5, presence_penalty=1.0, seed=11),
                dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, seed=12),
                dict(temperature=1.5, logit_bias={3: 5.0}, seed=13),
            ]
        )
    ]
    alone = Scheduler(engine, max_batch_size=16)
    rid = alone.add(*request)
    solo = run(alone)[rid].token_ids

    batch = Scheduler(engine, max_batch_size=16)
    ids = [batch.add(*r) for r in others[:7]]  # some are running when the request joins, the rest join with it
    batch.step()
    rid = batch.add(*request)
    ids += [batch.add(*r) for r in others[7:]]
    assert len(ids) == 15
    done = run(batch)
    assert done[rid].token_ids == solo
    assert all(len(done[i].token_ids) == p.max_tokens for i, (_, p) in zip(ids, others))
    [engine_alone] = engine.generate([request[0]], request[1])  # what Engine.generate draws with that seed
    assert engine_alone.token_ids == solo
    assert len(set(solo)) > 5  # a sample, not a greedy loop
