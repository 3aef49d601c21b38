"""The one builder of the tiny byte-level BPE tokenizers that model, engine and serving tests use."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
SPECIALS = (EOT, "<|im_start|>", "<|im_end|>")  # the ids the tokenize stage gives them: 0, 1, 2


def byte_bpe(corpus: Sequence[str], vocab_size: int = 300, specials: Sequence[str] = SPECIALS) -> Tokenizer:
    """A byte-level BPE trained on `corpus` (every byte in its alphabet, so any text encodes; multi-byte characters
    span several tokens), like the tokenize stage's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok
