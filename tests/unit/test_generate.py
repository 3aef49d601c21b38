"""The generation engine: KV-cache decoding, batching, every sampling control, streaming, scoring."""

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from model import GPT, Engine, GPTConfig, SamplingParams
from model.beam import beam_search
from model.sampling import apply_penalties, sampling_probs
from model.scheduler import Scheduler
from model.sequence import Detokenizer
from tests.helpers.tokenizers import byte_bpe

SENTENCES = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows.",
    "Émoji 🙂🎭 and 中文 text, 日本語 too; naïve café.",
    "All the world's a stage, and all the men and women merely players.",
]
EOT = "<|endoftext|>"


def make_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE trained on a few sentences (multi-byte characters span several tokens)."""
    return byte_bpe(SENTENCES * 3, vocab_size, specials=[EOT])


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size(), block_size=96, n_embd=32)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return Engine(model, tokenizer)


GREEDY = dict(temperature=0.0, ignore_eos=True)


def reference_greedy(model, ids, n):
    """Greedy decoding by recomputing the full context each step (no cache)."""
    ids = list(ids)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids


# -- decoding ------------------------------------------------------------------------------------
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


# -- the sampling distribution -------------------------------------------------------------------
def entropy(p):
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(4, 50) * 3


def test_temperature_scales_entropy(logits):
    h = [entropy(sampling_probs(logits, SamplingParams(temperature=t))) for t in (0.3, 1.0, 3.0)]
    assert torch.all(h[0] < h[1]) and torch.all(h[1] < h[2])
    torch.testing.assert_close(sampling_probs(logits, SamplingParams(temperature=1.0)), logits.softmax(-1))


def test_top_k_keeps_k_tokens(logits):
    p = sampling_probs(logits, SamplingParams(top_k=5))
    assert torch.all((p > 0).sum(-1) == 5)
    assert torch.equal(p.topk(5).indices.sort().values, logits.topk(5).indices.sort().values)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_nucleus(logits, top_p):
    p = sampling_probs(logits, SamplingParams(top_p=top_p))
    full = logits.softmax(-1)
    for row in range(4):
        kept = p[row] > 0
        k = int(kept.sum())
        order = full[row].argsort(descending=True)
        assert kept[order[:k]].all()  # the kept set is a prefix of the sorted tokens
        assert full[row][order[:k]].sum() >= top_p - 1e-6  # holding at least top_p ...
        assert k == 1 or full[row][order[: k - 1]].sum() < top_p  # ... and minimal


@pytest.mark.parametrize("min_p", [0.05, 0.3, 1.0])
def test_min_p_drops_unlikely_tokens(logits, min_p):
    p = sampling_probs(logits, SamplingParams(min_p=min_p))
    full = logits.softmax(-1)
    threshold = min_p * full.max(-1, keepdim=True).values
    assert torch.equal(p > 0, full >= threshold)


def test_penalties_lower_the_repeated_tokens_probability(logits):
    seen = torch.zeros(4, 50, dtype=torch.bool)
    seen[:, 7] = True
    counts = seen.float() * 3
    base = logits.softmax(-1)[:, 7]
    for params, kw in [
        (SamplingParams(repetition_penalty=1.5), dict(seen=seen)),
        (SamplingParams(presence_penalty=1.0), dict(counts=counts)),
        (SamplingParams(frequency_penalty=0.5), dict(counts=counts)),
    ]:
        p = apply_penalties(logits, params, **kw).softmax(-1)
        assert torch.all(p[:, 7] < base)
        others = torch.ones(50, dtype=torch.bool)
        others[7] = False
        assert torch.all(p[:, others] >= logits.softmax(-1)[:, others] - 1e-7)
    # frequency penalty scales with the count, presence penalty does not
    f1 = apply_penalties(logits, SamplingParams(frequency_penalty=0.5), counts=seen.float())
    f3 = apply_penalties(logits, SamplingParams(frequency_penalty=0.5), counts=counts)
    assert torch.all(f3[:, 7] < f1[:, 7])
    p1 = apply_penalties(logits, SamplingParams(presence_penalty=0.5), counts=seen.float())
    p3 = apply_penalties(logits, SamplingParams(presence_penalty=0.5), counts=counts)
    torch.testing.assert_close(p1, p3)


def test_penalties_reduce_repetition_end_to_end(engine):
    plain = engine.generate(["To be"], SamplingParams(max_tokens=30, **GREEDY))[0].token_ids
    penal = engine.generate(["To be"], SamplingParams(max_tokens=30, frequency_penalty=2.0, **GREEDY))[0].token_ids
    assert len(set(plain)) < 30  # the random model repeats itself ...
    assert len(set(penal)) > len(set(plain))  # ... and the penalty makes it repeat less


# -- every control changes what generate produces, on a model whose logits are known -----------------
A, B, C = 100, 101, 102  # three ordinary token ids


def fixed_logits_model(vocab_size: int, logits: dict[int, float]) -> GPT:
    """A model whose next-token logits are `logits` (-20 for every other id) whatever the context: every
    token embeds to the same vector, attention and MLP add nothing (zero weights), and the head reads the
    logits off the normed vector (all ones)."""
    cfg = GPTConfig.from_preset("tiny", vocab_size=vocab_size, n_embd=8, n_head=2, tie_embeddings=False)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        row = torch.full((vocab_size,), -20.0)
        row[list(logits)] = torch.tensor(list(logits.values()))
        model.lm_head.weight.copy_(row[:, None].expand(-1, cfg.n_embd) / cfg.n_embd)
    return model


def fixed_logits_engine(tokenizer, logits: dict[int, float]) -> Engine:
    engine = Engine(fixed_logits_model(tokenizer.get_vocab_size(), logits), tokenizer)
    with torch.no_grad():  # what the cases below reason from
        got = engine.model(torch.tensor([[C, A, B, A]]))[0][0]
    assert torch.allclose(got[:, list(logits)], torch.tensor(list(logits.values())).expand(4, -1), atol=1e-3)
    return engine


TOP_TWO = {A: 5.0, B: 4.0}
# (logits, prompt, penalty, greedy tokens): worked out by hand from the logits
PENALTY_CASES = [
    (TOP_TWO, [C], {}, [A, A, A, A, A, A]),  # no penalty: the top token for ever
    # frequency: A pays 0.6 per time it was generated: 5, 4.4, then 3.8 < 4 and the two take turns
    (TOP_TWO, [C], dict(frequency_penalty=0.6), [A, A, B, A, B, A]),
    # presence: A pays 1.5 once (3.5 < 4), then B pays once (2.5 < 3.5) and A leads for good
    (TOP_TWO, [C], dict(presence_penalty=1.5), [A, B, A, A, A, A]),
    # presence and frequency count generated tokens only: an A in the prompt changes nothing
    (TOP_TWO, [A], dict(presence_penalty=1.5), [A, B, A, A, A, A]),
    (TOP_TWO, [A], dict(frequency_penalty=0.6), [A, A, B, A, B, A]),
    # repetition (CTRL/HF): every token seen, the prompt's too, has its positive logit divided: 5 / 1.5 < 4
    (TOP_TWO, [C], dict(repetition_penalty=1.5), [A, B, A, A, A, A]),
    (TOP_TWO, [A], dict(repetition_penalty=1.5), [B, A, A, A, A, A]),
    # ... and its negative logit multiplied: -1 * 1.5 < -1.2 (dividing would raise it to -0.67)
    ({A: -1.0, B: -1.2}, [A], dict(repetition_penalty=1.5), [B, A, A, A, A, A]),
]


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


# -- stop strings --------------------------------------------------------------------------------
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


# -- logprobs and scoring ------------------------------------------------------------------------
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


def test_beam_search_beats_greedy_on_total_logprob(engine):
    prompts = ["To be", "Whether", "🙂 and"]
    for p in prompts:
        ids = engine.encode(p)
        [g] = engine.generate([ids], SamplingParams(max_tokens=10, **GREEDY))
        beams = engine.generate([ids], SamplingParams(max_tokens=10, num_beams=4, n=2, **GREEDY))
        assert len(beams) == 2 and beams[0].cumulative_logprob >= beams[1].cumulative_logprob
        [(lg, _), (lb, _)] = engine.loglikelihood([(ids, g.token_ids), (ids, beams[0].token_ids)])
        assert beams[0].cumulative_logprob == pytest.approx(lb, abs=1e-3)
        assert lb >= lg - 1e-4


def test_beam_search_with_one_beam_is_greedy(engine, model):
    ids = engine.encode("All the")
    greedy = reference_greedy(model, ids, 6)[len(ids) :]
    one_beam = SamplingParams(max_tokens=6, num_beams=1, **GREEDY)
    # generate takes the sampling path for one beam, so call the beam search itself too
    [b1] = beam_search(engine, 0, ids, one_beam)
    [g1] = engine.generate([ids], one_beam)
    assert b1.token_ids == g1.token_ids == greedy
    [(lg, _)] = engine.loglikelihood([(ids, greedy)])
    assert b1.cumulative_logprob == pytest.approx(lg, abs=1e-4)
    # with two beams the best beam differs in general, but is never worse
    [b2] = engine.generate([ids], SamplingParams(max_tokens=6, num_beams=2, **GREEDY))
    [(lb, _)] = engine.loglikelihood([(ids, b2.token_ids)])
    assert lb >= lg - 1e-4


# -- streaming -----------------------------------------------------------------------------------
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


@pytest.mark.parametrize(
    "text", ["", "plain ascii", "🙂🎭👩‍👩‍👧", "中文 text, 日本語", "naïve café", "\n\t mixed 🙂 中"]
)
def test_detokenizer_never_splits_characters(tokenizer, text):
    ids = tokenizer.encode(text).ids
    detok = Detokenizer(lambda x: tokenizer.decode(x, skip_special_tokens=True))
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 319), max_size=30))
def test_detokenizer_concatenation_equals_decode(ids):
    tok = _TOKENIZER
    decode = lambda x: tok.decode(x, skip_special_tokens=True)  # noqa: E731
    detok = Detokenizer(decode)
    assert "".join([detok.push(t) for t in ids] + [detok.flush()]) == decode(ids)


_TOKENIZER = make_tokenizer()


# -- validation and resources --------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=1.2), "min_p"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3.0), "frequency_penalty"),
        (dict(n=0), "n"),
        (dict(logprobs=-1), "logprobs"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, temperature=1.0), "temperature"),
        (dict(num_beams=2, n=3, temperature=0), "n"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(stop=[""]), "stop"),
        (dict(seed=1.5), "seed"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        SamplingParams(**kwargs)


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
