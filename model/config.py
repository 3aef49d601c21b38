"""Model configuration: one dataclass, a few named sizes.

>>> cfg = GPTConfig.from_preset("tiny", vocab_size=512)
>>> cfg.head_dim
16
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# Named sizes. vocab_size is a placeholder: callers pass the tokenizer's vocab size.
PRESETS: dict[str, dict] = {
    # tests: trains in seconds
    "tiny": dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64),
    # the CPU default: ~3.5M non-embedding params, trains in minutes on 2 cores
    "cpu": dict(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256),
    # GPT-2 small sized (~124M with a GPT-2 vocab)
    "124m": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # GPT-2 medium sized (~350M with a GPT-2 vocab)
    "350m": dict(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
}


@dataclass
class GPTConfig:
    # vocabulary and context
    vocab_size: int = 256  # number of token ids (the tokenizer's vocab size)
    block_size: int = 64  # maximum context length (prompt + generated tokens)
    # shape
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None = n_head
    n_embd: int = 64  # residual stream width
    intermediate_size: int | None = None  # SwiGLU hidden width; None/0 = ~8/3 * n_embd
    # numerics
    rope_theta: float = 10000.0  # rotary embedding base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # share the input embedding with the output head
    dropout: float = 0.0  # dropout on attention probs and residual branches (training only)
    init_std: float = 0.02  # std of the normal init; residual projections get init_std/sqrt(2*n_layer)

    def __post_init__(self):
        if self.n_kv_head is None or self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if not self.intermediate_size:
            # Llama's rule: 2/3 of 4*n_embd, rounded up to a multiple of 32
            hidden = int(2 * 4 * self.n_embd / 3)
            self.intermediate_size = 32 * ((hidden + 31) // 32)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"n_embd // n_head ({self.head_dim}) must be even for rotary embeddings")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be positive, got {self.init_std}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """A named size, with any field overridden (typically vocab_size)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**d)
