"""Beam search (model/beam.py): the best beam is never worse than greedy on total log-probability, and one beam is
greedy."""

import pytest

from model import SamplingParams
from model.beam import beam_search
from tests.helpers.generation import GREEDY, reference_greedy


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
