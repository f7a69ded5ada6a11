"""Widen the decoder MLPs of an NV-Embed checkpoint without changing what it computes.

Usage:
    python scripts/grow_model.py --model DIR --intermediate-size N --output OUT [--seed 0]

Each layer's SwiGLU MLP ``down(silu(gate(x)) * up(x))`` gets ``N - I`` new hidden units: new rows
of ``gate_proj`` / ``up_proj`` (random, with the existing rows' standard deviation) and new
**zero** columns of ``down_proj``, so the grown model's embeddings equal the original's exactly
at the start (the new units' contribution is multiplied by zero). Training then uses the new
units: the gradient of the zero columns is the new units' activations times the output gradient.
Everything else (attention, norms, the latent-attention head, the tokenizer files) is copied.

Why: the small shipped model was trained with a narrow MLP (512); a wider one gives the decoder
more capacity per token at the same attention cost, and because the decoder's projections are
the part INT8 accelerates (the head stays fp32), it also raises the INT8 speed-up. Growing the
trained model keeps what it learned instead of starting over (Net2Net / block-expansion style).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from nvembed_sdk.checkpoint import load_model, save_model
from nvembed_sdk.model import NVEmbedModel
from nvembed_sdk.text import TextPipeline


def grow_mlp(model: NVEmbedModel, intermediate_size: int, seed: int = 0) -> NVEmbedModel:
    """A copy of ``model`` whose decoder MLPs have ``intermediate_size`` hidden units."""
    old = model.cfg.text.intermediate_size
    if intermediate_size < old:
        raise SystemExit(f"--intermediate-size {intermediate_size} is below the current {old}")
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
                raise SystemExit(f"unexpected shape change for {name}: {tuple(w.shape)} -> {tuple(p.shape)}")
    return grown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (released layout)")
    ap.add_argument("--intermediate-size", type=int, required=True, help="new MLP width")
    ap.add_argument("--output", required=True, help="output checkpoint directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src = Path(args.model)
    model = load_model(src).eval()
    grown = grow_mlp(model, args.intermediate_size, args.seed).eval()
    probe = torch.randint(3, model.cfg.text.vocab_size, (2, 16))
    mask = torch.ones_like(probe)
    with torch.no_grad():
        diff = (model(probe, mask, mask) - grown(probe, mask, mask)).abs().max().item()
    if diff > 1e-5:
        raise SystemExit(f"grown model differs from the original by {diff:.2e}")
    save_model(grown, args.output)
    TextPipeline(src).save(args.output)
    n = sum(p.numel() for p in grown.parameters())
    print(f"{args.output}: MLP {model.cfg.text.intermediate_size} -> {args.intermediate_size}, "
          f"{n:,} parameters, max |embedding difference| {diff:.1e}")


if __name__ == "__main__":
    main()
