"""NV-Embed in plain PyTorch: bidirectional Mistral decoder + latent-attention pooling head.

Follows reference/NV-Embed-v2.md §3 exactly, quirks included:

* decoder: Mistral layers with a padding-only additive mask (no causal triangle, no sliding
  window), positions 0..T-1, RMSNorm computed in fp32, GQA through repeated K/V heads;
* head: tokens are the queries and the (constant) latent array is the keys/values; PreNorm
  LayerNorms, no attention mask, scale 1/sqrt(cross_dim_head), residual on the un-normalised
  states, GEGLU (value half first, exact erf GELU on the gate half), residual;
* pooling: plain masked mean over the pool mask in fp32, then L2 normalisation (eps 1e-12).

No export, quantisation or tokenisation code lives here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nvembed_sdk.config import DecoderConfig, LatentAttentionConfig, NVEmbedConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # True: x / sqrt(mean(x^2) + eps), the form ONNX Runtime fuses into one
        # SimplifiedLayerNormalization; same value as x * rsqrt(...) to about one ulp.
        self.div_form = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the activation dtype (fp16 x.pow(2) overflows); the result
        # is cast back before the weight multiply, as transformers' MistralRMSNorm does.
        dtype = x.dtype
        h = x.float()
        var = h.pow(2).mean(-1, keepdim=True)
        h = h / torch.sqrt(var + self.eps) if self.div_form else h * torch.rsqrt(var + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponent)  # (head_dim/2,)


def rope_cos_sin(inv_freq: torch.Tensor, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Computed in fp32 then cast to the activation dtype (transformers 4.42 behaviour).
    pos = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq.float())  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _same(_name: str, t: torch.Tensor) -> torch.Tensor:
    return t


class Attention(nn.Module):
    """Grouped-query self-attention, bidirectional (padding mask only)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        hd = cfg.head_dim
        assert hd is not None
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * hd, cfg.hidden_size, bias=False)
        # False: one SDPA call. True: MatMul -> fp32 Softmax -> MatMul written out, the pattern
        # TensorRT fuses and ModelOpt's MHA quantiser matches, with fp32 softmax in fp16 graphs.
        self.explicit_attention = False
        # Export-time only (exporters/smooth.py): called as bmm_quant(name, tensor) on the
        # explicit path's BMM operands, name in q (B, nkv, rep*T, hd), k / v (B, nkv, T, hd),
        # p (B, nkv, rep*T, T) and out (B, nkv, rep*T, hd); returns the tensor to use (calibration
        # records ranges, FP8-attention simulation fake-quantises). None: untouched.
        self.bmm_quant: Any = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # (T, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.n_head // self.n_kv
        # Query head i reads K/V head i // rep (transformers' repeat_kv).
        # mask: (B, 1, 1, T) additive, 0 on real keys and dtype-min on padded keys.
        if self.explicit_attention:
            # Written out for export: the rep query heads of one K/V head stacked along the
            # sequence axis, (B, nkv, rep*T, hd), so K/V are never copied per query head and
            # each K/V head is one larger MatMul. Softmax in fp32.
            qg = q.reshape(B, self.n_kv, rep * T, self.head_dim)
            fq = self.bmm_quant or _same
            scores = torch.matmul(fq("q", qg), fq("k", k).transpose(2, 3)).float() * (self.head_dim**-0.5)
            probs = torch.softmax(scores + mask.float(), dim=-1).to(q.dtype)  # (B, nkv, rep*T, T)
            y = fq("out", torch.matmul(fq("p", probs), fq("v", v))).reshape(B, self.n_head, T, self.head_dim)
        else:
            if rep > 1:
                k = k[:, :, None].expand(B, self.n_kv, rep, T, self.head_dim).reshape(B, self.n_head, T, self.head_dim)
                v = v[:, :, None].expand(B, self.n_kv, rep, T, self.head_dim).reshape(B, self.n_head, T, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask, cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Bidirectional Mistral: ``(input_ids, attention_mask) -> last_hidden_state (B, T, D)``."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        assert cfg.head_dim is not None
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers (after building on the meta device)."""
        assert self.cfg.head_dim is not None
        self.inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device=torch.device(device or "cpu"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)  # (B, T, D)
        # Padding-only additive mask (transformers' _prepare_4d_attention_mask), (B, 1, 1, T):
        # every query row, pads included, sees all real keys; no causal triangle.
        keep = attention_mask[:, None, None, :].to(x.dtype)
        mask = (1.0 - keep) * torch.finfo(x.dtype).min
        cos, sin = rope_cos_sin(self.inv_freq, T, x.dtype)
        for layer in self.layers:
            x = layer(x, mask, cos, sin)
        return self.norm(x)


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)  # first half is the value, second half the gate
        return value * F.gelu(gate)  # exact (erf) GELU


class LatentAttention(nn.Module):
    """The NV-Embed pooling head up to (not including) the masked mean.

    Tokens are the queries; the trainable latent array (r, d) gives keys and values, so each
    token's output depends only on its own hidden state and the constant latents.
    """

    def __init__(self, cfg: LatentAttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, c, inner = cfg.latent_dim, cfg.hidden_dim, cfg.inner_dim
        self.latents = nn.Parameter(torch.randn(cfg.num_latents_value, d))
        self.norm_q = nn.LayerNorm(d)  # released key: cross_attend_blocks.0.norm (acts on tokens)
        self.norm_kv = nn.LayerNorm(c)  # released key: cross_attend_blocks.0.norm_context (acts on latents)
        self.to_q = nn.Linear(d, inner, bias=False)
        self.to_kv = nn.Linear(c, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, d, bias=False)
        self.norm_ff = nn.LayerNorm(d)
        self.ff_in = nn.Linear(d, 8 * d)
        self.geglu = GEGLU()
        self.ff_out = nn.Linear(4 * d, d)
        self._kv_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def compute_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the latents, each (heads, r, dim_head)."""
        h, dh, r = self.cfg.num_cross_heads, self.cfg.cross_dim_head, self.cfg.num_latents_value
        kv = self.to_kv(self.norm_kv(self.latents))  # (r, 2*inner)
        k, v = kv.chunk(2, dim=-1)  # (r, inner) each; K = first half of the features
        k = k.reshape(r, h, dh).transpose(0, 1)  # (h, r, dh), head index outermost
        v = v.reshape(r, h, dh).transpose(0, 1)
        return k, v

    def _state_key(self, device_type: str) -> tuple:
        params = (self.latents, self.norm_kv.weight, self.norm_kv.bias, self.to_kv.weight)
        return (
            tuple((id(p), p._version, p.dtype, p.device) for p in params),
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None,
        )

    def latent_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the latents, computed once per loaded model and reused at inference.

        The cache is keyed on the parameters' identity and version counters, so any in-place
        update (optimizer step, ``load_state_dict``) or dtype/device move recomputes it; with
        gradients enabled it is never used.
        """
        if torch.is_grad_enabled() and (self.latents.requires_grad or self.to_kv.weight.requires_grad):
            return self.compute_kv()
        key = self._state_key(self.latents.device.type)
        if self._kv_cache is None or self._kv_cache[0] != key:
            with torch.no_grad():
                self._kv_cache = (key, self.compute_kv())
        return self._kv_cache[1]

    def forward(self, hidden: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``hidden`` (B, T, d) -> per-token outputs (B, T, d)."""
        B, T, _ = hidden.shape
        h, dh = self.cfg.num_cross_heads, self.cfg.cross_dim_head
        k, v = kv if kv is not None else self.latent_kv()  # (h, r, dh)
        q = self.to_q(self.norm_q(hidden)).view(B, T, h, dh).transpose(1, 2)  # (B, h, T, dh)
        r = k.shape[1]
        k = k.to(q.dtype)[None].expand(B, h, r, dh)  # (B, h, r, dh), no copy
        v = v.to(q.dtype)[None].expand(B, h, r, dh)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, dh); no mask, scale 1/sqrt(dh)
        o = o.transpose(1, 2).reshape(B, T, h * dh)
        hidden = self.to_out(o) + hidden  # residual on the un-normalised states
        return self.ff_out(self.geglu(self.ff_in(self.norm_ff(hidden)))) + hidden


def masked_mean(hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, T) -> (B, D) in fp32; plain division like the release (no epsilon)."""
    m = pool_mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1)


class NVEmbedModel(nn.Module):
    """Decoder + latent head: ``forward(input_ids, attention_mask, pool_mask) -> (B, D)``."""

    def __init__(self, cfg: NVEmbedConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg.text)
        self.head = LatentAttention(cfg.latent)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        self.decoder.reset_buffers(device)

    def init_weights(self, seed: int | None = None) -> NVEmbedModel:
        """Fresh random weights: N(0, initializer_range) linears/embeddings, randn latents."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.text.initializer_range
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, (nn.Linear, nn.Embedding)):
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
                    if getattr(mod, "bias", None) is not None:
                        mod.bias.zero_()
                elif isinstance(mod, (nn.LayerNorm, RMSNorm)):
                    mod.weight.fill_(1.0)
                    if getattr(mod, "bias", None) is not None:
                        mod.bias.zero_()
            self.head.latents.copy_(torch.randn(self.head.latents.shape, generator=gen))
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
        normalize: bool | None = None,
    ) -> torch.Tensor:
        """Embed a batch.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 on real tokens.
            pool_mask: (B, T), 1 on the tokens to average. Defaults to None: return the
                per-token head outputs (B, T, D) without pooling (the sentence-transformers path).
            normalize: L2-normalise the pooled vector. Defaults to the config's
                ``output_normalize``.

        Returns:
            (B, D) float32 embeddings, or (B, T, D) per-token outputs when ``pool_mask`` is None.
        """
        hidden = self.head(self.decoder(input_ids, attention_mask))  # (B, T, D)
        if pool_mask is None:
            return hidden
        pooled = masked_mean(hidden, pool_mask)  # (B, D) fp32
        if self.cfg.latent.output_normalize if normalize is None else normalize:
            pooled = F.normalize(pooled, p=2.0, dim=-1, eps=1e-12)
        return pooled


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["NVEmbedModel", "Decoder", "LatentAttention", "RMSNorm", "masked_mean", "num_parameters"]
