"""Model start-up for a training stage: fresh weights, an NV-Embed checkpoint or a Mistral causal LM,
then LoRA if asked.

``build_model`` is the one entry the loop calls; ``apply_lora`` wraps the decoder's projections
(the latent head stays fully trainable, as in NV-Embed); ``MergedView`` is what a checkpoint
writer saves from a LoRA model (deltas added, live model untouched).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvembed_sdk.checkpoint import MISTRAL_CAUSAL_LM, load_model, load_weights, safetensors_files
from nvembed_sdk.config import PRESETS, DecoderConfig, LatentAttentionConfig, NVEmbedConfig
from nvembed_sdk.errors import ArtifactError, InputError, fmt
from nvembed_sdk.model import NVEmbedModel
from nvembed_sdk.train.config import TrainConfig


def decoder_config(fields: dict[str, Any], where: str) -> DecoderConfig:
    """A :class:`DecoderConfig` whose ``head_dim`` is always derived (``hidden_size // num_attention_heads``).

    A training stage changes widths and head counts; a ``head_dim`` carried over from a preset
    or a file would silently stop matching them. One given explicitly must equal the derived one.

    Raises:
        InputError: a ``head_dim`` that is not ``hidden_size / num_attention_heads``.
    """
    fields = dict(fields)
    given = fields.pop("head_dim", None)
    text = DecoderConfig(**fields, head_dim=None)  # __post_init__ derives it
    if given is not None and given != text.head_dim:
        raise InputError(fmt(f"{where} head_dim", given, f"hidden_size / num_attention_heads = {text.head_dim} "
                             "(derived; leave it out)"))
    return text


def scratch_config(model: dict[str, Any], vocab_size: int, max_length: int | None = None) -> NVEmbedConfig:
    """An :class:`NVEmbedConfig` from ``{"preset", **DecoderConfig fields, "latent": {...}}``.

    The latent head's ``latent_dim``/``hidden_dim`` follow the decoder width (the released
    architecture requires them equal); ``vocab_size`` comes from the tokenizer.
    """
    spec = dict(model)
    preset = spec.pop("preset", "tiny-test")
    if preset not in PRESETS:
        raise InputError(fmt("model.preset", repr(preset), f"one of {sorted(PRESETS)}"))
    base = PRESETS[preset]
    latent_over = dict(spec.pop("latent", {}))
    max_len = int(spec.pop("max_length", max_length or base.max_length))
    try:
        preset_fields = {k: v for k, v in base.text.__dict__.items() if k != "head_dim"}  # the preset's widths' own
        text = decoder_config({**preset_fields, **spec, "vocab_size": vocab_size}, "train config model")
        h = text.hidden_size
        latent = LatentAttentionConfig(**{**base.latent.__dict__, **latent_over, "latent_dim": h, "hidden_dim": h})
    except TypeError as exc:
        raise InputError(fmt("train config model", str(exc), "DecoderConfig fields and a 'latent' dict")) from exc
    return NVEmbedConfig(text=text, latent=latent, max_length=max_len, torch_dtype="float32")


def load_mistral(path: str | Path, latent: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                 seed: int = 0) -> NVEmbedModel:
    """A Mistral causal-LM checkpoint as the decoder, with a freshly initialised latent head.

    ``model.*`` keys map to the decoder and ``lm_head.weight`` is dropped (the
    ``FROM_MISTRAL_CAUSAL_LM`` key table of :mod:`nvembed_sdk.checkpoint`); anything else, a
    missing weight or a wrong shape is an error naming the key.

    Raises:
        ArtifactError: missing files or unknown keys.
    """
    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ArtifactError(fmt("mistral init", f"no config.json in {p}", "a Mistral causal-LM checkpoint"))
    hf = json.loads(cfg_file.read_text(encoding="utf-8"))
    text = decoder_config({k: v for k, v in hf.items() if k in DecoderConfig.__dataclass_fields__ and v is not None},
                          f"{cfg_file}")
    h = text.hidden_size
    la = LatentAttentionConfig(**{**(latent or {}), "latent_dim": h, "hidden_dim": h})
    cfg = NVEmbedConfig(text=text, latent=la, torch_dtype="float32")
    with torch.device("meta"):
        model = NVEmbedModel(cfg)
    # The head is fresh: materialise and initialise it on its own (the decoder stays on meta
    # until its tensors arrive, so a 7B model is never held twice).
    model.head = fresh_head(cfg, seed).to(device)
    expected = {n: t.shape for n, t in model.decoder.named_parameters(prefix="decoder")}
    load_weights(model, safetensors_files(p), MISTRAL_CAUSAL_LM, expected, torch.float32, device)
    model.reset_buffers(device)
    for prm in model.parameters():
        prm.requires_grad_(True)
    return model


def fresh_head(cfg: NVEmbedConfig, seed: int = 0) -> nn.Module:
    """A newly initialised latent-attention head, by the rule of ``NVEmbedModel.init_weights``:
    N(0, initializer_range) linears, unit LayerNorms, N(0, 1) latents."""
    from nvembed_sdk.model import LatentAttention

    head = LatentAttention(cfg.latent)
    gen = torch.Generator().manual_seed(seed)
    std = cfg.text.initializer_range
    with torch.no_grad():
        for mod in head.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
        head.latents.copy_(torch.randn(head.latents.shape, generator=gen))
    return head


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device) -> NVEmbedModel:
    """The stage's starting weights, trainable, in fp32."""
    if cfg.init == "scratch":
        if cfg.init_path:
            raise InputError(fmt("init_path", cfg.init_path, "init 'scratch' takes no init_path (use init 'nvembed')"))
        model = NVEmbedModel(scratch_config(cfg.model, vocab_size, cfg.max_length)).init_weights(seed=cfg.seed)
    elif cfg.init == "nvembed":
        model = load_model(cfg.init_path, dtype="float32", device="cpu")  # type: ignore[arg-type]
    else:
        model = load_mistral(cfg.init_path, cfg.model.get("latent"), seed=cfg.seed)  # type: ignore[arg-type]
    if model.cfg.text.vocab_size != vocab_size:
        raise ArtifactError(fmt("tokenizer", f"{vocab_size} tokens", f"the model's vocab_size {model.cfg.text.vocab_size}"))
    if cfg.max_length:
        model.cfg = model.cfg.replace(max_length=cfg.max_length)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.to(device).train()


def apply_lora(model: NVEmbedModel, cfg: TrainConfig) -> nn.Module:
    """Wrap the decoder's projections with LoRA (peft); the latent head stays fully trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        from nvembed_sdk.errors import BackendUnavailableError

        raise BackendUnavailableError(fmt("LoRA", "peft is not installed", "pip install -e '.[train]' from the nvembed-sdk checkout")) from exc
    names = "|".join(cfg.lora.target_modules)
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=rf"decoder\.layers\.\d+\.(attn|mlp)\.({names})")
    peft_model = get_peft_model(model, lcfg)
    for p in peft_model.get_base_model().head.parameters():
        p.requires_grad_(True)  # NV-Embed trains the latent head fully, at the same lr
    return peft_model


def base_of(model: nn.Module) -> NVEmbedModel:
    """The NVEmbedModel inside (itself, or the one peft wraps)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[return-value]


class MergedView:
    """What ``save_model`` needs (``cfg``, ``named_parameters``, ``parameters``) with LoRA deltas
    added to the base weights, computed without touching the live model."""

    def __init__(self, model: nn.Module) -> None:
        base = base_of(model)
        self.cfg = base.cfg
        merged: dict[str, torch.Tensor] = {}
        for name, p in base.named_parameters():
            if "lora_" not in name:
                merged[name.replace(".base_layer", "")] = p.detach()
        for name, mod in base.named_modules():
            if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer"):
                w = mod.base_layer.weight.detach()
                merged[name + ".weight"] = w + mod.get_delta_weight("default").to(w.dtype)
        self._params = merged

    def named_parameters(self):
        return iter(self._params.items())

    def parameters(self):
        return iter(self._params.values())



def merged_model(model: nn.Module) -> NVEmbedModel:
    """A plain NVEmbedModel with any LoRA merged into the decoder weights (peft ``merge_and_unload``)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()  # type: ignore[no-any-return]
    return model  # type: ignore[return-value]



__all__ = ["MergedView", "apply_lora", "base_of", "build_model", "decoder_config", "fresh_head", "load_mistral", "merged_model",
           "scratch_config"]
