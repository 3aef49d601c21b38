"""The reference models (pipelines/evaluate/ngram.py): a byte n-gram that is normalised and beats uniform."""

from __future__ import annotations

import pytest

from pipelines.evaluate.ngram import ByteNgram, uniform_bpb
from tests.helpers.evaluation import read_split


def test_byte_ngram_is_normalised_and_beats_uniform(project):
    train, test = read_split(project, "train"), read_split(project, "test")
    lm = ByteNgram.fit([t.encode() for t in train], order=4)
    probs = [2 ** lm.log2_probs(b"the k" + bytes([b]))[-1] for b in range(256)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-9)
    assert lm.bits_per_byte([t.encode() for t in test]) < 8.0
    assert ByteNgram.fit([b"abab" * 100], 2).bits_per_byte([b"abab"]) < 1.0
    assert uniform_bpb(10, 20, 256) == pytest.approx(4.0)
