"""A decoder-only transformer with the layout of Hugging Face's LlamaForCausalLM.

Token embedding -> n_layer x [RMSNorm -> causal self-attention (rotary, optional GQA) -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> linear head. No biases.

Parameter names are exactly the Hugging Face ones (`model.layers.0.self_attn.q_proj.weight`, ...),
so exporting is a plain state_dict save (see model/hf.py). Pure PyTorch: no training, logging or
serving code lives here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one op instead of five: decoding is dispatch-bound (same result as HF's formula in float32)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # lower precision: normalise in float32, then scale in the input dtype (HF Llama's exact op order,
        # so exported models give the same logits)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # HF Llama's convention: the two halves of the head dim form the (real, imag) pairs
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with sin's first half negated ahead of time (see GPT._rope_init)
    so that rotate_half becomes a single roll: fewer kernel launches per decode step."""
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)


class KVCache:
    """Preallocated keys/values for decoding: per layer, (batch_size, n_kv_head, block_size, head_dim).

    Sized once from the config; a forward with `kv_cache=` writes its new keys/values at slots
    [pos, pos + T) in place and advances `pos`. Nothing is reallocated while decoding. Attention reads slots
    [first, pos + T): a continuous-batching scheduler moves `first` past the slots no row uses any more, so a
    step's attention costs what its longest row needs, not what the cache has held.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.n_kv_head, config.block_size, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.batch_size = batch_size
        self.block_size = config.block_size
        self.pos = 0  # number of filled slots
        self.first = 0  # first slot any row attends to

    def reset(self) -> None:
        self.pos = self.first = 0

    def window_start(self) -> int:
        """The first slot attention reads. A compiled forward reads from 0: with `first` as a symbolic slice
        start, inductor fails to lower the CPU attention kernel (torch 2.13)."""
        return 0 if torch.compiler.is_compiling() else self.first

    def reorder(self, index: torch.Tensor) -> None:
        """Rows of the cache follow `index` (beam search): row i becomes old row index[i]."""
        B = index.numel()
        for t in self.k + self.v:
            t[:B, :, : self.pos] = t[:, :, : self.pos].index_select(0, index)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def use_packed_weights() -> bool:
    """Eager inference runs the fused q/k/v and gate/up matmuls of packed_weight. Training keeps the separate
    linears (their gradients), and so does torch.compile: the cache check would break the graph in every layer."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling())


def packed_weight(module: nn.Module, *names: str) -> torch.Tensor:
    """The weights of the named child linears concatenated along the output dim, cached on `module`.

    One matmul instead of three (q/k/v) or two (gate/up) saves kernel launches, which dominate CPU
    decoding at small sizes. The parameters stay separate (HF names, training untouched); the copy is
    rebuilt whenever any weight changes (optimizer step, load_state_dict, .to(device), a new Parameter).
    Runs once per layer per decode step, so it reads the module dicts directly: nn.Module.__getattr__
    costs about a microsecond per lookup.
    """
    weights = [module._modules[n]._parameters["weight"] for n in names]
    key = [(w.data_ptr(), w._version, w.dtype) for w in weights]
    if module.__dict__.get("_packed_key") != key:
        module._packed = torch.cat([w.detach() for w in weights])
        module._packed_key = key
    return module._packed


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout

    def qkv(self, x, cos, sin):
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        if not use_packed_weights():
            q = self.q_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            k = self.k_proj(x).view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
            v = self.v_proj(x).view(B, T, nkv, hs).transpose(1, 2)
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v
        # inference: one fused matmul, and one rotary over the query and key heads together
        qkv = F.linear(x, packed_weight(self, "q_proj", "k_proj", "v_proj"))
        qkv = qkv.view(B, T, nh + 2 * nkv, hs).transpose(1, 2)  # (B, nh + 2 nkv, T, hs)
        qk = apply_rotary(qkv[:, : nh + nkv], cos, sin)
        return qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :]

    def forward(self, x, cos, sin, mask, is_causal, kv_cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if kv_cache is not None:
            start, end = kv_cache.pos, kv_cache.pos + T
            kc, vc = kv_cache.k[layer], kv_cache.v[layer]
            kc[:B, :, start:end] = k  # in-place write into the preallocated cache
            vc[:B, :, start:end] = v
            first = kv_cache.window_start()
            k, v = kc[:B, :, first:end], vc[:B, :, first:end]
        # also for single-token decoding: on torch 2.13 CPU the fused kernel beats explicit matmuls
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))

    def weights(self, x, cos, sin) -> torch.Tensor:
        """Attention probabilities (B, nh, T, T), computed explicitly (for plots only)."""
        q, k, _ = self.qkv(x, cos, sin)
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        T = x.size(1)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        if not use_packed_weights():
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:  # inference: one fused matmul
            gate, up = F.linear(x, packed_weight(self, "gate_proj", "up_proj")).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, is_causal, kv_cache=None, layer=0):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, kv_cache, layer)
        if not self.training:  # no dropout module calls at inference: decoding is dispatch-bound
            x = x + a
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.dropout(a)
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # same module tree as HF LlamaForCausalLM, so state_dict keys are the HF names
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
                layers=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                norm=RMSNorm(config.n_embd, config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope_init()
        self.apply(self._init_weights)
        # scaled init of the projections that write into the residual stream (GPT-2)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _rope_init(self) -> None:
        # rotary tables for every position up to block_size (HF's rotate_half layout: freqs repeated twice)
        cfg, device = self.config, self.model.embed_tokens.weight.device
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
        freqs = torch.outer(torch.arange(cfg.block_size, device=device).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (block_size, hs)
        sin = emb.sin()
        sin[:, : cfg.head_dim // 2] *= -1  # rotate_half(x) * sin == roll(x, hs/2) * (sin with its first half negated)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, V) float32, mean cross-entropy loss or None).

        position_ids: (B, T) rotary positions; default: counted from the mask if one is given
            (left padding), else start..start+T where start is kv_cache.pos (0 without a cache).
        attention_mask: (B, start+T), 1 for real tokens and 0 for padding, covering the cached
            slots too (those before kv_cache.window_start() are not read). The causal mask is always applied.
        kv_cache: a KVCache; the new keys/values are written at its current position.
        logits_to_keep: if > 0, compute logits only for the last that many positions.
        """
        x = self.hidden_states(idx, position_ids=position_ids, attention_mask=attention_mask, kv_cache=kv_cache)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.logits(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final normalised hidden states (B, T, n_embd) that lm_head turns into logits; arguments as
        in forward. Scoring uses it to run the head only where logits are needed: with a 4k vocab and a
        128-wide model the head is 40 % of a forward's matmul work."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        end = start + T
        if end > self.config.block_size:
            raise ValueError(f"sequence length {end} exceeds block_size {self.config.block_size}")
        if kv_cache is not None and B > kv_cache.batch_size:
            raise ValueError(f"batch size {B} exceeds the KV cache's batch size {kv_cache.batch_size}")

        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]  # (T, hs), broadcasts
        if position_ids is not None:
            cos, sin = (
                self.rope_cos[position_ids].unsqueeze(1),
                self.rope_sin[position_ids].unsqueeze(1),
            )  # (B, 1, T, hs)
        x = self.model.embed_tokens(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        first = kv_cache.window_start() if kv_cache is not None else 0
        mask, is_causal = self._attn_mask(T, start, first, attention_mask, idx.device)

        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, is_causal, kv_cache, i)
        if kv_cache is not None:
            kv_cache.pos = end
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., n_embd) final hidden states -> (..., vocab_size) float32 logits."""
        return self.lm_head(hidden).float()

    @staticmethod
    def _attn_mask(T: int, start: int, first: int, attention_mask, device):
        """(mask over key slots [first, start + T) for SDPA, or None; is_causal). True = may attend."""
        end = start + T
        if attention_mask is None:
            if T == 1:
                return None, False  # one new query sees every key in the window
            if start == 0:
                return None, True
            i = torch.arange(T, device=device)[:, None] + start
            j = torch.arange(first, end, device=device)[None, :]
            return j <= i, False  # (T, end - first)
        keys = attention_mask[:, first:end].bool()[:, None, None, :]  # (B, 1, 1, end - first)
        if T == 1:
            return keys, False
        i = torch.arange(T, device=device)[:, None] + start
        j = torch.arange(first, end, device=device)[None, :]
        # a padding query sees only itself, so no row is fully masked (which would give NaNs)
        return (keys & (j <= i)) | (j == i), False  # (B, 1, T, end - first)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor:
        """Attention probabilities for a prompt: (n_layer, B, n_head, T, T), float32.

        A separate slow path (explicit softmax), so the normal forward keeps its fused kernel.
        """
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = self.model.embed_tokens(idx)
        cos, sin = self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype)
        maps = []
        for block in self.model.layers:
            maps.append(block.self_attn.weights(block.input_layernorm(x), cos, sin))
            x = block(x, cos, sin, None, True)
        return torch.stack(maps)

    def resize_token_embeddings(self, vocab_size: int, mean_rows: Sequence[int] = ()) -> None:
        """Grow the embedding and output rows to `vocab_size` (transformers' method of the same name, for tokens
        added to the tokenizer). The new rows, and the existing rows `mean_rows` names, start as the mean of the
        other rows: an average token, neither favoured by the output head nor never predicted."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"vocab_size {vocab_size} is below the model's {old}: rows are never removed")
        fresh = set(range(old, vocab_size)) | set(mean_rows)
        if any(not 0 <= i < vocab_size for i in fresh):
            raise ValueError(f"mean_rows must lie in [0, {vocab_size}), got {sorted(mean_rows)}")
        known = torch.tensor([i for i in range(old) if i not in fresh], dtype=torch.long)
        rows = torch.tensor(sorted(fresh), dtype=torch.long)

        def grown(weight: torch.Tensor) -> nn.Parameter:
            w = torch.empty(vocab_size, weight.size(1), dtype=weight.dtype, device=weight.device)
            w[:old] = weight.detach()
            w[rows] = weight.detach()[known].mean(dim=0)
            return nn.Parameter(w, requires_grad=weight.requires_grad)

        self.model.embed_tokens.weight = grown(self.model.embed_tokens.weight)
        self.model.embed_tokens.num_embeddings = vocab_size
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head.weight = grown(self.lm_head.weight)
        self.lm_head.out_features = vocab_size
        self.config = replace(self.config, vocab_size=vocab_size)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors counted once); non_embedding drops the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (PaLM appendix B): 6N + 12 * n_layer * n_embd * seq_len.

        N counts every weight matmul, including the output head whether tied or not.
        """
        cfg = self.config
        T = seq_len if seq_len is not None else cfg.block_size
        n_matmul = self.num_params(non_embedding=True)  # includes an untied lm_head
        if cfg.tie_embeddings:
            n_matmul += cfg.vocab_size * cfg.n_embd  # the tied head is still a matmul
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
