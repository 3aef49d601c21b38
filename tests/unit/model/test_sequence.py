"""Incremental detokenizing (model/sequence.py's Detokenizer): never a split character, and the pieces concatenate
to what decode gives."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.sequence import Detokenizer
from tests.helpers.generation import make_tokenizer


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
