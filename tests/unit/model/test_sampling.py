"""SamplingParams and the sampling distribution (model/sampling.py): temperature, top_k, top_p, min_p and the
penalties on known logits, filter_logits bit for bit Hugging Face's warpers, and bad arguments named."""

import pytest
import torch
from hypothesis import given, settings

from model import SamplingParams
from model.sampling import apply_penalties, filter_logits, sampling_probs
from tests.helpers.sampling import batches, hf_warped


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


@settings(max_examples=200, deadline=None)
@given(batches())
def test_the_reference_filter_is_hugging_faces_bit_for_bit(batch):
    # the sampler hands the rows it cannot decide to it, so ties split by the top_p cut fall as HF's sort puts them
    logits, params = batch
    for r, p in enumerate(params):
        x = logits[r : r + 1]
        assert torch.equal(filter_logits(x / p.temperature, p), hf_warped(x, p))


# -- validation ----------------------------------------------------------------------------------------------------
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
