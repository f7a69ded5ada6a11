from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nvembed_sdk.config import PRESETS
from nvembed_sdk.model import Decoder, NVEmbedModel


def _hf_mistral(cfg):
    transformers = pytest.importorskip("transformers")
    hf = transformers.MistralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, sliding_window=None, attn_implementation="eager",
    )
    torch.manual_seed(1)
    return transformers.MistralModel(hf).eval()


def _renamed(state):
    out = {}
    for k, v in state.items():
        out[k.replace("input_layernorm", "attn_norm").replace("post_attention_layernorm", "mlp_norm")
           .replace("self_attn", "attn")] = v
    return out


def _batch(vocab=500):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 13), generator=g)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    return ids, mask


def test_decoder_equals_transformers_mistral_with_bidirectional_padding_mask():
    cfg = PRESETS["tiny-test"].text
    hf = _hf_mistral(cfg)
    ours = Decoder(cfg).eval()
    ours.load_state_dict(_renamed(hf.state_dict()), strict=True)
    ids, mask = _batch()
    # transformers takes a ready 4D additive mask as-is: padding-only, no causal triangle.
    mask4 = (1.0 - mask[:, None, None, :].float()).expand(3, 1, 13, 13) * torch.finfo(torch.float32).min
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask4).last_hidden_state
        out = ours(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)


def test_decoder_is_bidirectional():
    cfg = PRESETS["tiny-test"].text
    dec = Decoder(cfg).eval()
    ids, _ = _batch()
    mask = torch.ones_like(ids)
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 7) % cfg.vocab_size
    with torch.no_grad():
        a, b = dec(ids, mask), dec(ids2, mask)
    assert not torch.allclose(a[:, 0], b[:, 0]), "first token must see the last (no causal mask)"


def _reference_latent_block(head, hidden):
    """Straightforward NV-Embed latent block, written per head with explicit softmax."""
    cfg = head.cfg
    B, T, D = hidden.shape
    lat = head.latents  # (r, d)
    hn = F.layer_norm(hidden, (D,), head.norm_q.weight, head.norm_q.bias, 1e-5)
    ln = F.layer_norm(lat, (D,), head.norm_kv.weight, head.norm_kv.bias, 1e-5)
    q = hn @ head.to_q.weight.T  # (B, T, h*dh)
    kv = ln @ head.to_kv.weight.T  # (r, 2*h*dh)
    inner = cfg.num_cross_heads * cfg.cross_dim_head
    k, v = kv[:, :inner], kv[:, inner:]
    outs = []
    for h in range(cfg.num_cross_heads):
        sl = slice(h * cfg.cross_dim_head, (h + 1) * cfg.cross_dim_head)
        att = torch.softmax(q[..., sl] @ k[:, sl].T / math.sqrt(cfg.cross_dim_head), dim=-1)
        outs.append(att @ v[:, sl])
    o = torch.cat(outs, dim=-1) @ head.to_out.weight.T
    h1 = o + hidden
    x = F.layer_norm(h1, (D,), head.norm_ff.weight, head.norm_ff.bias, 1e-5) @ head.ff_in.weight.T + head.ff_in.bias
    a, g = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    ff = (a * 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))) @ head.ff_out.weight.T + head.ff_out.bias
    return ff + h1


def test_latent_block_equals_straightforward_reference(tiny_model):
    head = tiny_model.head
    with torch.no_grad():
        for mod in (head.norm_q, head.norm_kv, head.norm_ff):  # non-trivial affine params
            mod.weight.normal_(1.0, 0.1)
            mod.bias.normal_(0.0, 0.1)
        hidden = torch.randn(2, 7, head.cfg.latent_dim)
        torch.testing.assert_close(head(hidden), _reference_latent_block(head, hidden), rtol=1e-5, atol=1e-5)


def test_pooling_and_normalisation(tiny_model):
    ids, mask = _batch(tiny_model.cfg.text.vocab_size)
    pool = mask.clone()
    pool[:, :2] = 0
    with torch.no_grad():
        tokens = tiny_model(ids, mask)  # (B, T, D), no pooling
        pooled = tiny_model(ids, mask, pool)
        raw = tiny_model(ids, mask, pool, normalize=False)
    m = pool.unsqueeze(-1).float()
    expected = (tokens * m).sum(1) / m.sum(1)
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, F.normalize(expected, dim=-1), rtol=1e-5, atol=1e-6)
    assert tokens.shape == (3, 13, tiny_model.cfg.dim)


def test_padding_does_not_change_embedding(tiny_model):
    ids, _ = _batch(tiny_model.cfg.text.vocab_size)
    single_ids = ids[:1, :6]
    one = torch.ones_like(single_ids)
    padded_ids = torch.cat([single_ids, torch.full((1, 7), 2)], dim=1)
    padded_mask = torch.cat([one, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = tiny_model(single_ids, one, one)
        b = tiny_model(padded_ids, padded_mask, padded_mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_latent_kv_cached_once_and_invalidated_by_updates(tiny_model):
    head = tiny_model.head
    with torch.no_grad():
        k1, _ = head.latent_kv()
        k2, _ = head.latent_kv()
        assert k1 is k2, "latents' K/V must be computed once per loaded model"
        head.latents.add_(1.0)  # in-place update bumps the version counter
        k3, _ = head.latent_kv()
    assert k3 is not k1 and not torch.allclose(k1, k3)


def test_latent_kv_not_cached_when_training(tiny_model):
    tiny_model.train()
    for p in tiny_model.parameters():
        p.requires_grad_(True)
    ids, mask = _batch(tiny_model.cfg.text.vocab_size)
    out = tiny_model(ids, mask, mask)
    out.sum().backward()
    assert tiny_model.head.latents.grad is not None and tiny_model.head.to_kv.weight.grad.abs().sum() > 0


def test_fp16_rmsnorm_statistics_do_not_overflow():
    from nvembed_sdk.model import RMSNorm

    norm = RMSNorm(64, 1e-5).half()
    x = torch.full((1, 64), 1000.0, dtype=torch.float16)  # x**2 = 1e6 overflows fp16
    y = norm(x)
    assert torch.isfinite(y).all() and torch.allclose(y.float(), torch.ones(1, 64), atol=1e-2)


def test_meta_build_has_no_real_storage():
    with torch.device("meta"):
        m = NVEmbedModel(PRESETS["nv-embed-v2"])
    assert all(p.is_meta for p in m.parameters())
    assert sum(p.numel() for p in m.parameters()) == 7_851_016_192


def test_export_forms_equal_the_module(tiny_model):
    """The written-out forms the exporter traces (explicit GQA attention without K/V copies,
    RMSNorm as a division) compute what SDPA and the plain RMSNorm compute, padding included."""
    from nvembed_sdk.model import RMSNorm

    torch.manual_seed(0)
    ids = torch.randint(3, tiny_model.cfg.text.vocab_size, (3, 11))
    mask = (torch.arange(11)[None] < torch.tensor([[11], [4], [7]])).long()
    assert tiny_model.cfg.text.num_attention_heads > tiny_model.cfg.text.num_key_value_heads  # GQA is exercised
    with torch.no_grad():
        ref = tiny_model(ids, mask)
        for layer in tiny_model.decoder.layers:
            layer.attn.explicit_attention = True
        for mod in tiny_model.modules():
            if isinstance(mod, RMSNorm):
                mod.div_form = True
        out = tiny_model(ids, mask)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert not torch.equal(ref[0], ref[1])
