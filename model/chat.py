"""ChatML, quill's one chat template: the token ids of a conversation and which of them the assistant wrote.

    <|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n

The tokenize stage stores the same rendering as Jinja (`chat_template` in the tokenizer's files), so
`AutoTokenizer.apply_chat_template` and `encode_chat` (the engine, the server, fine-tuning) give the same ids
(tests/unit/model/test_chat.py compares them).
Content is encoded literally: a user who types "<|im_end|>" does not close their turn.

    >>> encode_chat(tokenizer, [{"role": "user", "content": "Hi"}]).ids[-3:]   # ... <|im_start|> assistant \n
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")


class NoChatTemplateError(ValueError):
    """The tokenizer has no ChatML markers: the model was not made for conversations."""


@dataclass(frozen=True)
class ChatEncoding:
    ids: list[int]
    assistant: list[bool]  # per id: written by the assistant (its content and the <|im_end|> that ends its turn)


def chat_markers(tokenizer: Tokenizer) -> tuple[int, int]:
    """The ids of <|im_start|> and <|im_end|>; NoChatTemplateError when the tokenizer lacks them."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if IM_START not in vocab or IM_END not in vocab:
        raise NoChatTemplateError(f"the tokenizer has no {IM_START} / {IM_END} tokens: it has no chat template")
    return vocab[IM_START], vocab[IM_END]


def literal(tokenizer: Tokenizer) -> Tokenizer:
    """A copy that encodes special-token text as plain text (for message content)."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = True
    return copy


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
) -> ChatEncoding:
    """ChatML ids of `messages` ({"role", "content"}), ending with the assistant's header when add_generation_prompt;
    `tokenizer` should be `literal(...)`'s copy, so content cannot forge a marker."""
    im_start, im_end = chat_markers(tokenizer)
    newline = tokenizer.encode("\n").ids
    ids: list[int] = []
    mask: list[bool] = []
    for m in messages:
        header = tokenizer.encode(f"{m['role']}\n").ids
        body = tokenizer.encode(f"{m['role']}\n{m['content']}").ids
        # role and content encode as one piece, as the template's text does; the header is the ids they share
        # (all of the header's: byte-level pre-tokenizing never merges across its newline)
        split = next((i for i, (a, b) in enumerate(zip(header, body)) if a != b), min(len(header), len(body)))
        mine = m["role"] == "assistant"
        ids += [im_start, *body, im_end, *newline]
        mask += [False] * (1 + split) + [mine] * (len(body) - split) + [mine] + [False] * len(newline)
    if add_generation_prompt:
        tail = [im_start, *tokenizer.encode("assistant\n").ids]
        ids += tail
        mask += [False] * len(tail)
    return ChatEncoding(ids, mask)
