"""Properties of the transformer itself (model/transformer.py): shapes, causality, the KV-cache path, init,
training, attention maps."""

import math

import pytest
import torch

from model import GPT, GPTConfig, KVCache
from tests.helpers.models import tiny


# this module's tiny model (vocab 97), not model/conftest.py's generation model
@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny()).eval()


# -- forward -------------------------------------------------------------------------------------------------------
def test_logits_shape_dtype_and_loss(model):
    idx = torch.randint(0, 97, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 97) and logits.dtype == torch.float32 and loss is None
    logits2, loss = model(idx, idx)
    assert torch.equal(logits, logits2) and loss.ndim == 0
    targets = idx.clone()
    targets[:, :5] = -100  # ignored positions do not count
    manual = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 97), idx[:, 5:].reshape(-1))
    assert torch.allclose(model(idx, targets)[1], manual, atol=1e-6)
    assert model(idx, logits_to_keep=1)[0].shape == (3, 1, 97)


def test_causality(model):
    """Changing a future token never changes earlier logits."""
    torch.manual_seed(1)
    idx = torch.randint(0, 97, (2, 40))
    base, _ = model(idx)
    for t in (0, 13, 39):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        out, _ = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-5, rtol=0)
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_matches_full_forward(n_kv_head):
    torch.manual_seed(2)
    m = GPT(tiny(n_kv_head=n_kv_head)).eval()
    idx = torch.randint(0, 97, (2, 30))
    full, _ = m(idx)
    cache = KVCache(m.config, batch_size=4)  # larger than needed: rows are sliced
    with torch.inference_mode():
        parts = [m(idx[:, :10], kv_cache=cache)[0]]  # prefill
        parts.append(m(idx[:, 10:17], kv_cache=cache)[0])  # a chunk after a prefix (offset causal mask)
        parts += [m(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(17, 30)]  # one token at a time
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_with_mask_and_positions_matches_unpadded(model):
    torch.manual_seed(3)
    a, b = torch.randint(0, 97, (1, 20)), torch.randint(0, 97, (1, 12))
    idx = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], dim=1)])
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :8] = False
    out, _ = model(idx, attention_mask=mask)  # positions counted from the mask
    torch.testing.assert_close(out[0], model(a)[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 8:], model(b)[0][0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_too_long_sequence_is_refused(model):
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_initial_loss_is_about_ln_vocab():
    torch.manual_seed(4)
    for cfg in (GPTConfig.from_preset("tiny", vocab_size=512), tiny(vocab_size=2000, tie_embeddings=False)):
        m = GPT(cfg)
        idx = torch.randint(0, cfg.vocab_size, (8, 32))
        _, loss = m(idx, torch.randint(0, cfg.vocab_size, (8, 32)))
        assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.3


def test_residual_projections_have_scaled_init():
    torch.manual_seed(5)
    cfg = GPTConfig.from_preset("tiny", n_layer=8, n_embd=128)
    m = GPT(cfg)
    expect = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    for block in m.model.layers:
        assert abs(block.self_attn.o_proj.weight.std().item() - expect) < 0.2 * expect
        assert abs(block.mlp.down_proj.weight.std().item() - expect) < 0.2 * expect
        assert abs(block.self_attn.q_proj.weight.std().item() - cfg.init_std) < 0.2 * cfg.init_std


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(6)
    m = GPT(tiny())
    idx = torch.randint(0, 97, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(300):
        _, loss = m(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.1


def test_dropout_only_in_training():
    torch.manual_seed(7)
    m = GPT(tiny(dropout=0.5))
    idx = torch.randint(0, 97, (2, 10))
    m.eval()
    assert torch.equal(m(idx)[0], m(idx)[0])
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])


def test_inference_follows_weight_changes():
    """The fused q/k/v and gate/up weights used at inference are rebuilt after any change to the weights."""
    torch.manual_seed(8)
    m = GPT(tiny()).eval()
    idx = torch.randint(0, 97, (2, 10))

    def agree() -> bool:  # inference (packed weights) against the training path (separate linears)
        with torch.no_grad():
            packed = m(idx)[0]
        with torch.enable_grad():
            return torch.allclose(packed, m(idx)[0].detach(), atol=1e-5)

    assert agree()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(idx, idx)[1].backward()
    opt.step()  # in-place update
    assert agree()
    m.load_state_dict({k: v + 0.01 for k, v in m.state_dict().items()})  # in-place copy
    assert agree()
    attn = m.model.layers[0].self_attn
    attn.k_proj.weight = torch.nn.Parameter(torch.randn_like(attn.k_proj.weight))  # a new Parameter object
    mlp = m.model.layers[1].mlp
    mlp.up_proj.weight = torch.nn.Parameter(torch.randn_like(mlp.up_proj.weight))
    assert agree()


def test_tied_embeddings_share_storage():
    tied, untied = GPT(tiny()), GPT(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == 97 * 32


@pytest.mark.parametrize("tie", [True, False])
def test_added_tokens_get_mean_rows_and_the_old_tokens_keep_their_logits(tie):
    torch.manual_seed(0)
    model = GPT(tiny(tie_embeddings=tie)).eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        before = model(x)[0]
        old_embed, old_head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    model.resize_token_embeddings(99, mean_rows=[3])  # two new tokens, and row 3 (a padding row, say) reset
    assert model.config.vocab_size == 99 and model.model.embed_tokens.weight.shape == (99, 32)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    known = [i for i in range(97) if i != 3]
    for new, old in ((model.model.embed_tokens.weight, old_embed), (model.lm_head.weight, old_head)):
        torch.testing.assert_close(new[known], old[known], rtol=0, atol=0)
        for row in (3, 97, 98):
            torch.testing.assert_close(new[row], old[known].mean(0))
    with torch.no_grad():
        after = model(x)[0]
    torch.testing.assert_close(after[..., known], before[..., known])  # the new rows change no other logit
    with pytest.raises(ValueError, match="never removed"):
        model.resize_token_embeddings(50)


def test_num_params_and_flops():
    m = GPT(tiny())
    cfg = m.config
    per_layer = 4 * cfg.n_embd * cfg.n_embd + 3 * cfg.n_embd * cfg.intermediate_size + 2 * cfg.n_embd
    assert m.num_params() == cfg.vocab_size * cfg.n_embd + cfg.n_layer * per_layer + cfg.n_embd
    assert m.num_params(non_embedding=True) == m.num_params() - cfg.vocab_size * cfg.n_embd
    n_matmul = cfg.n_layer * (per_layer - 2 * cfg.n_embd) + cfg.vocab_size * cfg.n_embd
    assert m.flops_per_token(16) == pytest.approx(
        6 * (n_matmul + cfg.n_layer * 2 * cfg.n_embd + cfg.n_embd) + 12 * cfg.n_layer * cfg.n_embd * 16
    )
    assert m.flops_per_token() > m.flops_per_token(16)  # default: block_size


def test_hf_parameter_names():
    names = set(GPT(tiny(tie_embeddings=False)).state_dict())
    assert {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    } <= names
    assert not any("bias" in n or "rope" in n for n in names)


# -- attention maps ------------------------------------------------------------------------------------------------
def test_attention_maps_are_causal_distributions(model):
    idx = torch.randint(0, 97, (2, 12))
    maps = model.attention_maps(idx)
    cfg = model.config
    assert maps.shape == (cfg.n_layer, 2, cfg.n_head, 12, 12)
    torch.testing.assert_close(maps.sum(-1), torch.ones(cfg.n_layer, 2, cfg.n_head, 12))
    assert torch.all(maps.triu(diagonal=1) == 0)


def test_attention_maps_reproduce_the_attention_output(model):
    """The explicit maps times V equal what the fused kernel computes."""
    idx = torch.randint(0, 97, (1, 9))
    maps = model.attention_maps(idx)
    block = model.model.layers[0]
    x = block.input_layernorm(model.model.embed_tokens(idx))
    cos, sin = model.rope_cos[:9], model.rope_sin[:9]
    _, _, v = block.self_attn.qkv(x, cos, sin)
    y = (maps[0] @ v).transpose(1, 2).reshape(1, 9, -1)
    torch.testing.assert_close(
        block.self_attn.o_proj(y), block.self_attn(x, cos, sin, None, True), atol=1e-5, rtol=1e-4
    )
