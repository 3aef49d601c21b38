"""Whether a batch of documents decodes back from its token ids to exactly its text: a shard must never hold
altered text (a normalizer, an unknown token).

A byte-level BPE token stands for a fixed byte string, so a document survives the round trip exactly when its
tokens' byte strings, end to end, are its UTF-8 bytes. That is checked with numpy on whole batches, about twice
as fast as decoding them: the table of byte strings is built once per tokenizer from GPT-2's byte-to-character
map (the one the ByteLevel pre-tokenizer and decoder use) and checked against the tokenizer's own decoder token
by token. A tokenizer the map does not fit, and any batch that differs, are decoded to name the document.

    >>> check = RoundTrip(tokenizer)
    >>> check.first_altered(texts, encoded, tokens, counts)   # None, or the index of the first altered text
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer


def byte_to_char() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def token_bytes(tokenizer: Tokenizer) -> list[bytes] | None:
    """Each token id's byte string, or None when a token's does not decode as the tokenizer decodes it."""
    to_byte = {char: byte for byte, char in byte_to_char().items()}
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    pieces = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        token = tokenizer.id_to_token(token_id)
        if token is None:
            return None
        if token in special:  # added tokens decode as their content
            pieces.append(token.encode("utf-8"))
        elif all(char in to_byte for char in token):
            pieces.append(bytes(to_byte[char] for char in token))
        else:
            return None
    decoded = tokenizer.decode_batch([[i] for i in range(len(pieces))], skip_special_tokens=False)
    if any(piece.decode("utf-8", errors="replace") != text for piece, text in zip(pieces, decoded)):
        return None
    return pieces


class RoundTrip:
    """The round-trip check for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        pieces = token_bytes(tokenizer)
        self.fast = pieces is not None
        if pieces is not None:
            self.lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
            self.offsets = np.cumsum(self.lengths) - self.lengths
            self.table = np.frombuffer(b"".join(pieces), np.uint8)

    def first_altered(
        self, texts: list[str], encoded: list[bytes], tokens: np.ndarray, counts: np.ndarray
    ) -> int | None:
        """The index of the first text with decode(encode(text)) != text, or None. `encoded` holds the texts'
        UTF-8 bytes, `tokens` their ids end to end and `counts` how many belong to each text."""
        if self.fast and self.same_bytes(encoded, tokens, counts):
            return None
        return self.first_decoded_differently(texts, tokens, counts)

    def same_bytes(self, encoded: list[bytes], tokens: np.ndarray, counts: np.ndarray) -> bool:
        """Whether the tokens' byte strings are the texts' bytes, text by text."""
        lengths = self.lengths[tokens]
        ends = np.concatenate(([0], np.cumsum(lengths)))
        per_text = np.diff(ends[np.concatenate(([0], np.cumsum(counts)))])
        if not np.array_equal(per_text, np.fromiter(map(len, encoded), np.int64, len(encoded))):
            return False
        # position k of the batch's bytes is byte (k - where its token starts) of that token's string
        starts = np.repeat(self.offsets[tokens] - ends[:-1], lengths)
        return np.array_equal(self.table[np.arange(int(ends[-1])) + starts], np.frombuffer(b"".join(encoded), np.uint8))

    def first_decoded_differently(self, texts: list[str], tokens: np.ndarray, counts: np.ndarray) -> int | None:
        ids = np.split(tokens, np.cumsum(counts)[:-1])
        decoded = self.tokenizer.decode_batch([d.tolist() for d in ids], skip_special_tokens=False)
        return next((i for i, (text, back) in enumerate(zip(texts, decoded)) if back != text), None)
