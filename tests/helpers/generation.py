"""What the model/ tests of generation share (tests/unit/model/): a byte-level BPE trained on a few sentences, greedy
settings and greedy decoding without the cache, and models whose next-token logits are known whatever the
context (the hand-worked penalty cases are worked out on them)."""

import torch
from tokenizers import Tokenizer

from model import GPT, Engine, GPTConfig
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


GREEDY = dict(temperature=0.0, ignore_eos=True)


def reference_greedy(model, ids, n):
    """Greedy decoding by recomputing the full context each step (no cache)."""
    ids = list(ids)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids


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
