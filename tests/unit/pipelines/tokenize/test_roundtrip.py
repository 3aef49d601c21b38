"""The batch round-trip check: byte tables against the tokenizer's own decoder."""

from __future__ import annotations

from itertools import chain

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from pipelines.common.params import TokenizerParams
from pipelines.tokenize.roundtrip import RoundTrip
from pipelines.tokenize.stage import train_tokenizer

TEXTS = [
    "The king's men, all of them.",
    "Ünïcödé — “quotes”, emoji 🎭 and 中文.",
    "A typed <|endoftext|> and <|im_end|> are text.",
    "",
    "\t  trailing spaces  \n\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tokenizer = train_tokenizer(iter(TEXTS * 20), TokenizerParams(vocab_size=300))
    tokenizer.encode_special_tokens = True
    return tokenizer


def batch(tokenizer: Tokenizer, texts: list[str]) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    ids = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    counts = np.array([len(d) for d in ids], np.int64)
    return [t.encode("utf-8") for t in texts], np.fromiter(chain.from_iterable(ids), np.int64), counts


def test_the_stages_tokenizer_is_checked_on_bytes_and_passes(tokenizer):
    check = RoundTrip(tokenizer)
    assert check.fast  # the byte table fits a tokenizer the stage trains
    encoded, tokens, counts = batch(tokenizer, TEXTS)
    assert check.same_bytes(encoded, tokens, counts)
    assert check.first_altered(TEXTS, encoded, tokens, counts) is None


def test_an_alteration_of_the_same_length_is_found_and_named(tokenizer):
    """A lower-casing normalizer keeps every length: only the bytes show the change, in the fourth text."""
    texts = ["all lower case", "still lower", "", "One Capital"]
    lowering = Tokenizer.from_str(tokenizer.to_str())
    lowering.normalizer = normalizers.Lowercase()
    check = RoundTrip(lowering)
    assert check.fast
    encoded, tokens, counts = batch(lowering, texts)
    assert not check.same_bytes(encoded, tokens, counts)
    assert check.first_altered(texts, encoded, tokens, counts) == 3


def test_a_token_between_two_texts_cannot_hide_a_change(tokenizer):
    """Each text's bytes are compared on their own: a longer first text and a shorter second do not cancel."""
    check = RoundTrip(tokenizer)
    encoded, tokens, counts = batch(tokenizer, ["The king", "men"])
    moved = np.array([counts[0] + 1, counts[1] - 1])  # the first text's count takes the second's first token
    assert check.same_bytes(encoded, tokens, counts)
    assert not check.same_bytes(encoded, tokens, moved)


def test_a_tokenizer_the_byte_map_does_not_fit_is_decoded_instead():
    vocab = {"[UNK]": 0, "hello": 1, "wörld": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    check = RoundTrip(tokenizer)
    assert not check.fast  # its tokens are words, not byte-level strings ("ö" would stand for the byte 0xF6)
    texts = ["hello", "hello wörld", "hello there"]
    encoded, tokens, counts = batch(tokenizer, texts)
    assert check.first_altered(texts, encoded, tokens, counts) == 2  # "there" is unknown: "hello [UNK]"
