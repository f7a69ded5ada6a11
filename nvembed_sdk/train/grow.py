"""Grow an NV-Embed checkpoint (wider decoder MLPs, more decoder layers) without changing what it computes.

Usage:
    nvembed grow --model DIR [--intermediate-size N] [--layers L] --output OUT [--seed 0]

Each layer's SwiGLU MLP ``down(silu(gate(x)) * up(x))`` gets ``N - I`` new hidden units: new rows
of ``gate_proj`` / ``up_proj`` (random, with the existing rows' standard deviation) and new
**zero** columns of ``down_proj``, so the grown model's embeddings equal the original's exactly
at the start (the new units' contribution is multiplied by zero). Training then uses the new
units: the gradient of the zero columns is the new units' activations times the output gradient.
Everything else (attention, norms, the latent-attention head, the tokenizer files) is copied.

``--layers L`` inserts ``L - n`` decoder layers, spread evenly, each right after the layer it
copies, with its ``o_proj`` and ``down_proj`` set to **zero**: both branches of a pre-norm block
add to the residual stream, so the new block starts as the identity and the embeddings are again
unchanged. Its other weights are the copied layer's (a trained starting point, as in block
expansion / stacking), and the zero projections get gradient at once (their inputs are non-zero).

Why: the small shipped model was trained with a narrow MLP (512); a wider one gives the decoder
more capacity per token at the same attention cost, and because the decoder's projections are
the part INT8 accelerates (the head stays fp32), it also raises the INT8 speed-up. Growing the
trained model keeps what it learned instead of starting over (Net2Net / block-expansion style).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nvembed_sdk.checkpoint import load_model, save_model
from nvembed_sdk.errors import InputError, ParityError, fmt
from nvembed_sdk.model import NVEmbedModel
from nvembed_sdk.text import TextPipeline


def grow_mlp(model: NVEmbedModel, intermediate_size: int, seed: int = 0) -> NVEmbedModel:
    """A copy of ``model`` whose decoder MLPs have ``intermediate_size`` hidden units."""
    old = model.cfg.text.intermediate_size
    if intermediate_size < old:
        raise InputError(fmt("--intermediate-size", intermediate_size, f"at least the current {old} (growing never shrinks; below the current is refused)"))
    cfg = replace(model.cfg, text=replace(model.cfg.text, intermediate_size=intermediate_size))
    grown = NVEmbedModel(cfg)
    src = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in grown.named_parameters():
            w = src[name]
            if w.shape == p.shape:
                p.copy_(w)
            elif name.endswith(("gate_proj.weight", "up_proj.weight")):  # (I, D) -> (N, D)
                p[:old] = w
                p[old:] = torch.randn(p.shape[0] - old, p.shape[1], generator=gen) * w.std()
            elif name.endswith("down_proj.weight"):  # (D, I) -> (D, N), new columns zero
                p.zero_()
                p[:, :old] = w
            else:
                raise InputError(fmt(f"grow {name}", f"{tuple(w.shape)} -> {tuple(p.shape)}", "only MLP widths change"))
    return grown


def layer_sources(n_old: int, n_new: int) -> list[int]:
    """For each layer of the grown decoder, the old layer it copies (new ones follow their source).

    4 -> 6 gives ``[0, 1, 1, 2, 3, 3]``: the copies of layers 1 and 3 sit right after them.
    """
    extra = n_new - n_old
    if extra > n_old:
        raise InputError(fmt("--layers", n_new, f"at most twice the current {n_old} layers"))
    # duplicate the layers ending each of ``extra`` equal spans of the stack
    dup = {((k + 1) * n_old) // extra - 1 for k in range(extra)} if extra else set()
    out: list[int] = []
    for i in range(n_old):
        out += [i, i] if i in dup else [i]
    return out


def grow_layers(model: NVEmbedModel, num_layers: int) -> tuple[NVEmbedModel, list[int]]:
    """A copy of ``model`` with ``num_layers`` decoder layers; inserted ones start as the identity."""
    old = model.cfg.text.num_hidden_layers
    if num_layers < old:
        raise InputError(fmt("--layers", num_layers, f"at least the current {old} (below the current is refused)"))
    sources = layer_sources(old, num_layers)
    cfg = replace(model.cfg, text=replace(model.cfg.text, num_hidden_layers=num_layers))
    grown = NVEmbedModel(cfg)
    src = dict(model.named_parameters())
    seen: set[int] = set()
    with torch.no_grad():
        for new_i, old_i in enumerate(sources):
            inserted = old_i in seen
            seen.add(old_i)
            for name, p in grown.decoder.layers[new_i].named_parameters():
                p.copy_(src[f"decoder.layers.{old_i}.{name}"])
                if inserted and name in ("attn.o_proj.weight", "mlp.down_proj.weight"):
                    p.zero_()
        for name, p in grown.named_parameters():
            if not name.startswith("decoder.layers."):
                p.copy_(src[name])
    return grown, sources


def grow_checkpoint(model_dir: str | Path, output: str | Path, intermediate_size: int | None = None,
                    layers: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Grow the checkpoint at ``model_dir`` into ``output`` (weights, config, tokenizer files).

    Args:
        model_dir: a released-layout checkpoint directory.
        output: the grown checkpoint's directory.
        intermediate_size: new MLP width. Defaults to None (unchanged).
        layers: new number of decoder layers. Defaults to None (unchanged).
        seed: seed of the new MLP rows. Defaults to 0.

    Returns:
        ``{"intermediate_size": (old, new), "layers": (old, new), "sources", "parameters", "max_diff"}``.

    Raises:
        InputError: nothing to do, or a size below the current one.
        ParityError: the grown model's embeddings differ from the original's (a bug, never expected).
    """
    if intermediate_size is None and layers is None:
        raise InputError(fmt("nvembed grow", "nothing to do", "--intermediate-size and/or --layers"))
    src = Path(model_dir)
    model = load_model(src).eval()
    grown = model
    if intermediate_size is not None:
        grown = grow_mlp(grown, intermediate_size, seed)
    sources = list(range(model.cfg.text.num_hidden_layers))
    if layers is not None:
        grown, sources = grow_layers(grown, layers)
    grown = grown.eval()
    probe = torch.randint(3, model.cfg.text.vocab_size, (2, 16))  # (2, 16) token ids
    mask = torch.ones_like(probe)
    with torch.no_grad():
        diff = (model(probe, mask, mask) - grown(probe, mask, mask)).abs().max().item()
    if diff > 1e-5:
        raise ParityError(fmt("grown model", f"max |embedding difference| {diff:.2e}", "<= 1e-5 (same outputs)"))
    save_model(grown, output)
    TextPipeline(src).save(output)
    return {"intermediate_size": (model.cfg.text.intermediate_size, grown.cfg.text.intermediate_size),
            "layers": (model.cfg.text.num_hidden_layers, grown.cfg.text.num_hidden_layers), "sources": sources,
            "parameters": sum(p.numel() for p in grown.parameters()), "max_diff": diff}


__all__ = ["grow_checkpoint", "grow_layers", "grow_mlp", "layer_sources"]
