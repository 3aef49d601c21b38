"""The generation engine (model/engine.py): KV-cache decoding, batching, every sampling control through generate,
stop strings, logprobs and log-likelihoods, streaming, validation and resources, loading a Hugging Face folder."""

import math
import random

import pytest
import torch

from model import Engine, SamplingParams, load_pretrained, save_pretrained
from tests.helpers.generation import (
    EOT,
    GREEDY,
    PENALTY_CASES,
    A,
    B,
    C,
    fixed_logits_engine,
    reference_greedy,
)
from tests.helpers.models import make_model


# -- decoding ------------------------------------------------------------------------------------------------------
def test_eos_detected(engine, tokenizer):
    assert engine.eos_token_id == tokenizer.token_to_id(EOT)


def test_greedy_matches_full_recompute(engine, model):
    prompt = engine.encode("To be, or not")
    [c] = engine.generate([prompt], SamplingParams(max_tokens=20, **GREEDY))
    assert c.token_ids == reference_greedy(model, prompt, 20)[len(prompt) :]
    assert c.finish_reason == "length" and c.prompt_token_ids == prompt
    assert c.text == engine.decode(c.token_ids)


@pytest.mark.slow
def test_compiled_engine_generates_what_the_eager_one_does(model, tokenizer):
    """Engine(compile=True) (torch.compile with dynamic shapes) on CPU: same greedy tokens, padded batches too."""
    prompts = ["To be, or not", "Whether 'tis nobler in the mind to"]
    params = SamplingParams(max_tokens=8, **GREEDY)
    eager = Engine(model, tokenizer).generate(prompts, params)
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = Engine(model, tokenizer, compile=True).generate(prompts, params)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    # a graph break per layer made compiled decoding slower than eager (the fused-weight cache)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_batched_prompts_of_different_lengths_equal_one_by_one(engine):
    prompts = ["To", "Whether 'tis nobler in the mind", "🙂 中文", "All the world's a stage, and all"]
    params = SamplingParams(max_tokens=12, **GREEDY)
    batched = engine.generate(prompts, params)
    single = [engine.generate([p], params)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert [c.index for c in batched] == [0, 1, 2, 3]


def test_each_row_stops_on_its_own(engine):
    prompts = ["To be", "Whether 'tis"]
    free = engine.generate(prompts, SamplingParams(max_tokens=10, **GREEDY))
    # a token row 0 makes and row 1 never does: row 0 stops at it, row 1 runs to its length
    candidates = [t for t in free[0].token_ids if t not in free[1].token_ids]
    assert candidates, (free[0].token_ids, free[1].token_ids)
    stop_id = candidates[0]
    first = free[0].token_ids.index(stop_id)
    out = engine.generate(prompts, SamplingParams(max_tokens=10, stop_token_ids=[stop_id], **GREEDY))
    assert out[0].token_ids == free[0].token_ids[: first + 1] and out[0].finish_reason == "stop"
    assert out[0].text == engine.decode(free[0].token_ids[:first])  # the stop token is not in the text
    assert out[1].token_ids == free[1].token_ids and out[1].finish_reason == "length"


def test_eos_ends_a_row_unless_ignored(model, tokenizer, engine):
    [free] = engine.generate(["To be"], SamplingParams(max_tokens=6, **GREEDY))
    eos = free.token_ids[2]  # pretend the third greedy token is end-of-text
    e = Engine(model, tokenizer, eos_token_id=eos)
    [c] = e.generate(["To be"], SamplingParams(max_tokens=6, temperature=0.0))
    first = free.token_ids.index(eos)
    assert c.token_ids == free.token_ids[: first + 1] and c.finish_reason == "stop"
    assert c.text == e.decode(free.token_ids[:first])
    [c] = e.generate(["To be"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert c.token_ids == free.token_ids and c.finish_reason == "length"


def test_n_samples_grouped_by_prompt(engine):
    out = engine.generate(["To be", "Whether"], SamplingParams(max_tokens=6, n=3, seed=1, ignore_eos=True))
    assert [c.index for c in out] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(c.token_ids) for c in out[:3]}) > 1


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=123, ignore_eos=True)
    a = engine.generate(["To be", "🙂"], params)
    b = engine.generate(["To be", "🙂"], params)
    c = engine.generate(["To be", "🙂"], SamplingParams(max_tokens=16, temperature=1.0, seed=124, ignore_eos=True))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_top_k_1_equals_greedy(engine):
    greedy = engine.generate(["To be", "Whether"], SamplingParams(max_tokens=10, **GREEDY))
    top1 = engine.generate(
        ["To be", "Whether"], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    )
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]


def test_penalties_reduce_repetition_end_to_end(engine):
    plain = engine.generate(["To be"], SamplingParams(max_tokens=30, **GREEDY))[0].token_ids
    penal = engine.generate(["To be"], SamplingParams(max_tokens=30, frequency_penalty=2.0, **GREEDY))[0].token_ids
    assert len(set(plain)) < 30  # the random model repeats itself ...
    assert len(set(penal)) > len(set(plain))  # ... and the penalty makes it repeat less


# -- every control changes what generate produces, on a model whose logits are known (tests/helpers/generation.py) ---


PENALTY_IDS = [
    *("none", "frequency", "presence", "presence-prompt", "frequency-prompt"),
    *("repetition", "repetition-prompt", "repetition-negative"),
]


@pytest.mark.parametrize("logits, prompt, penalty, tokens", PENALTY_CASES, ids=PENALTY_IDS)
def test_each_penalty_turns_greedy_away_from_repeated_tokens(tokenizer, logits, prompt, penalty, tokens):
    engine = fixed_logits_engine(tokenizer, logits)
    [c] = engine.generate([prompt], SamplingParams(max_tokens=6, **penalty, **GREEDY))
    assert c.token_ids == tokens


# (filter, the tokens it leaves) for p(A, B, C) = softmax(2, 1, 0) = (0.665, 0.245, 0.090)
FILTER_CASES = [
    ({}, {A, B, C}),
    (dict(top_p=0.5), {A}),  # A alone holds 0.5
    (dict(top_p=0.8), {A, B}),  # A and B hold 0.91; A alone 0.665 < 0.8
    (dict(min_p=0.5), {A}),  # below 0.5 * 0.665 = 0.33: B and C
    (dict(min_p=0.2), {A, B}),  # below 0.2 * 0.665 = 0.13: C
    (dict(top_k=2), {A, B}),
]


FILTER_IDS = ["unfiltered", "top_p-0.5", "top_p-0.8", "min_p-0.5", "min_p-0.2", "top_k-2"]


@pytest.mark.parametrize("sampling_filter, kept", FILTER_CASES, ids=FILTER_IDS)
def test_each_filter_narrows_what_is_sampled(tokenizer, sampling_filter, kept):
    engine = fixed_logits_engine(tokenizer, {A: 2.0, B: 1.0, C: 0.0})
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=0, ignore_eos=True, **sampling_filter)
    [c] = engine.generate([[C]], params)
    assert set(c.token_ids) == kept  # never a dropped token; every kept one drawn in 60 (seeded) samples


@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_repeat_ngram_size(engine, size):
    prompt = engine.encode("To be, or not to be")
    for beams in (1, 3):
        [c] = engine.generate(
            [prompt], SamplingParams(max_tokens=25, no_repeat_ngram_size=size, num_beams=beams, **GREEDY)
        )
        seq = prompt + c.token_ids
        grams = [tuple(seq[i : i + size]) for i in range(len(seq) - size + 1)]
        generated = grams[len(prompt) - size + 1 :]
        assert len(c.token_ids) == 25
        assert all(grams[: grams.index(g)].count(g) == 0 for g in generated)


# -- stop strings --------------------------------------------------------------------------------------------------
def test_stop_string_cuts_at_first_match_and_excludes_it(engine):
    # seeded sampling: the random model's greedy text repeats one token, where every stop string matches early
    sampled = dict(temperature=1.0, seed=3, ignore_eos=True)
    [free] = engine.generate(["To be"], SamplingParams(max_tokens=30, **sampled))
    text = free.text

    def clean(s: str) -> bool:
        return s.isprintable() and s.strip() == s and "\ufffd" not in s

    stop = text[8:10]
    assert len(stop) == 2 and clean(stop), text
    [c] = engine.generate(["To be"], SamplingParams(max_tokens=30, stop=[stop, "never-there"], **sampled))
    assert c.text == text[: text.find(stop)] and c.finish_reason == "stop"
    # the earliest match wins whichever stop string is listed first: `later` first occurs after `stop` does
    laters = [text[i : i + 2] for i in range(14, len(text) - 1) if text.find(text[i : i + 2]) > text.find(stop)]
    laters = [s for s in laters if clean(s)]
    assert laters, text
    [c2] = engine.generate(["To be"], SamplingParams(max_tokens=30, stop=[laters[0], stop], **sampled))
    assert c2.text == text[: text.find(stop)] and c2.finish_reason == "stop"
    # ... also when one token completes both: "xyz" brings "yz" (listed first) and "xy", which begins earlier
    pieces = [engine.decode([t]) for t in free.token_ids]
    both = [
        p[:3]
        for p in pieces
        if len(p) >= 3
        and p[:3].isprintable()
        and text.find(p[:2]) == text.find(p[:3]) == text.find(p[1:3]) - 1  # both first seen in this token
    ]
    assert both, pieces
    xyz = both[0]
    [c3] = engine.generate(["To be"], SamplingParams(max_tokens=30, stop=[xyz[1:], xyz[:2]], **sampled))
    assert c3.text == text[: text.find(xyz)] and c3.finish_reason == "stop"


def test_stop_string_split_across_tokens(engine):
    [free] = engine.generate(["Whether"], SamplingParams(max_tokens=30, **GREEDY))
    pieces = [engine.decode([t]) for t in free.token_ids]
    # a stop string made of the end of one token and the start of the next
    i = next(
        i
        for i in range(3, len(pieces) - 1)
        if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i] + pieces[i + 1]
    )
    stop = pieces[i][-1] + pieces[i + 1][0]
    [c] = engine.generate(["Whether"], SamplingParams(max_tokens=30, stop=stop, **GREEDY))
    assert c.text == free.text[: free.text.find(stop)] and c.finish_reason == "stop"
    assert len(c.token_ids) <= i + 2


# -- logprobs and log-likelihoods ----------------------------------------------------------------------------------
def test_logprobs_match_the_full_forward(engine, model):
    prompt = engine.encode("To be, or not")
    [c] = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.8, seed=5, logprobs=3, ignore_eos=True))
    seq = torch.tensor([prompt + c.token_ids])
    ref = torch.log_softmax(model(seq)[0][0], -1)
    assert len(c.logprobs) == 8
    for i, (tok, rec) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert rec.token_id == tok and rec.token == engine.token_text(tok)
        assert rec.logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert [t for t, _, _ in rec.top] == row.topk(3).indices.tolist()
        assert [x for _, _, x in rec.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


def test_echo_prompt_logprobs_match(engine, model):
    prompts = [engine.encode("To be, or not to be"), engine.encode("中文")]  # different lengths: left padding
    out = engine.generate(prompts, SamplingParams(max_tokens=1, echo=True, logprobs=2, **GREEDY))
    for p, c in zip(prompts, out):
        ref = torch.log_softmax(model(torch.tensor([p]))[0][0], -1)
        assert [r.token_id for r in c.prompt_logprobs] == p
        assert c.prompt_logprobs[0].logprob is None
        for i in range(1, len(p)):
            assert c.prompt_logprobs[i].logprob == pytest.approx(ref[i - 1, p[i]].item(), abs=1e-4)
    [c] = engine.generate([prompts[0]], SamplingParams(max_tokens=0, echo=True))
    assert c.token_ids == [] and len(c.prompt_logprobs) == len(prompts[0])


def test_loglikelihood(engine, model):
    ctx = engine.encode("To be, or")
    greedy = reference_greedy(model, ctx, 4)[len(ctx) :]
    other = [(greedy[0] + 1) % model.config.vocab_size] + greedy[1:]
    # the first three share a context (scored from one cached context, continuations of 4, 4 and 1 tokens)
    requests = [(ctx, greedy), (ctx, other), (ctx, greedy[:1]), (engine.encode("Whether"), engine.encode(" the mind"))]
    out = engine.loglikelihood(requests, batch_size=4)
    alone = engine.loglikelihood(requests, batch_size=1)
    assert [ll for ll, _ in out] == pytest.approx([ll for ll, _ in alone], abs=1e-4)
    assert [g for _, g in out] == [g for _, g in alone]
    for (c, x), (ll, _) in zip(requests, out):
        ref = torch.log_softmax(model(torch.tensor([c + x]))[0][0], -1)
        expect = sum(ref[len(c) - 1 + i, t].item() for i, t in enumerate(x))
        assert ll == pytest.approx(expect, abs=1e-4)
    assert out[0][1] is True and out[1][1] is False and out[0][0] > out[1][0]
    with pytest.raises(ValueError, match="block_size"):
        engine.loglikelihood([([1] * 90, [2] * 10)])


def test_loglikelihood_batches_several_shared_contexts(engine, model):
    """Items with different context lengths share one batch (context padding masked, each at its own positions)
    and score as one by one; a long context beside a long continuation would overflow the cache, so they split."""
    rng = random.Random(0)
    V, bs = model.config.vocab_size, model.config.block_size
    requests = []
    for n_ctx, n_choices in [(5, 4), (17, 3), (2, 4), (30, 2), (9, 1)]:
        ctx = [rng.randrange(1, V) for _ in range(n_ctx)]
        requests += [(ctx, [rng.randrange(1, V) for _ in range(rng.randrange(1, 6))]) for _ in range(n_choices)]
    long_ctx, short_ctx = [rng.randrange(1, V) for _ in range(bs - 2)], [rng.randrange(1, V) for _ in range(3)]
    requests += [
        (long_ctx, [1, 2]),
        (long_ctx, [3]),
        (short_ctx, [rng.randrange(1, V) for _ in range(bs - 4)]),
        (short_ctx, [5, 6]),
    ]
    batched = engine.loglikelihood(requests, batch_size=16)
    alone = engine.loglikelihood(requests, batch_size=1)
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in alone], abs=1e-4)
    assert [g for _, g in batched] == [g for _, g in alone]


# -- streaming -----------------------------------------------------------------------------------------------------
STREAM_PROMPTS = ["To be", "🙂🎭", "中文 text, 日本語", "naïve café"]


@pytest.mark.parametrize("prompt", STREAM_PROMPTS)
@pytest.mark.parametrize("sampled", [False, True])
def test_stream_concatenation_equals_generate(engine, prompt, sampled):
    params = SamplingParams(max_tokens=24, temperature=1.0 if sampled else 0.0, seed=11, ignore_eos=True)
    [c] = engine.generate([prompt], params)
    chunks = list(engine.stream(prompt, params))
    assert "".join(ch.text for ch in chunks) == c.text
    assert [ch.token_id for ch in chunks] == c.token_ids
    assert chunks[-1].finish_reason == c.finish_reason and all(ch.finish_reason is None for ch in chunks[:-1])


def test_stream_with_stop_string_holds_back_a_possible_match(engine):
    [free] = engine.generate(["To be"], SamplingParams(max_tokens=30, **GREEDY))
    stop = free.text[10:13]
    params = SamplingParams(max_tokens=30, stop=[stop], **GREEDY)
    [c] = engine.generate(["To be"], params)
    chunks = list(engine.stream("To be", params))
    assert "".join(ch.text for ch in chunks) == c.text == free.text[: free.text.find(stop)]
    assert chunks[-1].finish_reason == "stop"


# -- validation and resources --------------------------------------------------------------------------------------
def test_too_long_request_is_refused(engine):
    with pytest.raises(ValueError, match="block_size"):
        engine.generate([[1] * 90], SamplingParams(max_tokens=7))
    with pytest.raises(ValueError, match="max_tokens"):
        list(engine.stream([1] * 50, SamplingParams(max_tokens=50)))
    [c] = engine.generate([[1] * 90], SamplingParams(max_tokens=6, **GREEDY))  # exactly fits
    assert len(c.token_ids) == 6


def test_out_of_vocab_prompt_is_refused(engine):
    with pytest.raises(ValueError, match="vocab_size"):
        engine.generate([[10_000]], SamplingParams(max_tokens=1))


def test_kv_cache_is_allocated_once(engine):
    engine.generate(["warm", "up", "batch", "four"], SamplingParams(max_tokens=4, **GREEDY))
    cache = engine._kv
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    size = cache.nbytes()
    assert cache.batch_size >= 4
    assert (
        size
        == 2
        * engine.config.n_layer
        * cache.batch_size
        * engine.config.n_kv_head
        * engine.config.block_size
        * engine.config.head_dim
        * 4
    )
    for i in range(50):
        batch = ["To be", "🙂"][: 1 + i % 2]
        engine.generate(batch, SamplingParams(max_tokens=8, temperature=1.0, seed=i))
        assert engine._kv is cache and cache.nbytes() == size
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs


def test_hf_tokenizer_and_path_are_accepted(model, tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOT)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    params = SamplingParams(max_tokens=5, **GREEDY)
    ref = Engine(model, tokenizer).generate(["To be"], params)[0].token_ids
    for tok in (hf, tmp_path, tmp_path / "tokenizer.json"):
        e = Engine(model, tok)
        assert e.eos_token_id == tokenizer.token_to_id(EOT)
        assert e.generate(["To be"], params)[0].token_ids == ref
    with pytest.raises(TypeError, match="tokenizer"):
        Engine(model, object())


def test_entropy_is_finite_for_padded_batches(engine):
    # long and short prompts together: pad rows must never produce NaNs
    out = engine.generate(
        ["x", "To be, or not to be, that is the question."], SamplingParams(max_tokens=4, logprobs=1, **GREEDY)
    )
    assert all(math.isfinite(r.logprob) for c in out for r in c.logprobs)


# -- from a Hugging Face folder ------------------------------------------------------------------------------------
def test_engine_from_pretrained(tmp_path, tokenizer_dir):
    m = make_model()
    out = save_pretrained(m, tmp_path / "m", tokenizer_dir=tokenizer_dir)
    engine = Engine.from_pretrained(out)
    assert engine.eos_token_id == 0
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    assert engine.generate(["To be"], params)[0].token_ids == Engine(m, out).generate(["To be"], params)[0].token_ids


def test_an_engine_loads_in_the_dtype_it_is_asked_for(tmp_path, tokenizer_dir):
    out = save_pretrained(make_model(), tmp_path / "m", tokenizer_dir=tokenizer_dir)
    saved = Engine.from_pretrained(out, dtype="auto")
    half = Engine.from_pretrained(out, dtype="bfloat16")
    assert next(saved.model.parameters()).dtype == torch.float32
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        full, low = saved.model(idx)[0], half.model(idx)[0]
    assert low.dtype == torch.float32  # logits stay float32 whatever the weights are
    torch.testing.assert_close(low, full, atol=0.1, rtol=0.05)
    [c] = half.generate(["To be"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(c.token_ids) == 5
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, got 'bf16'"):
        Engine.from_pretrained(out, dtype="bf16")
    with pytest.raises(ValueError, match="floating-point"):
        load_pretrained(out, dtype=torch.int8)
