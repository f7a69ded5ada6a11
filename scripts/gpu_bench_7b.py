"""Throughput and precision of the full NV-Embed-v2 shape (7.85 B parameters) on one GPU.

Random weights (the released weights are not shipped; speed does not depend on their values),
built on the meta device and materialised on the GPU. Prints texts/s and tokens/s per precision
at two shapes, peak GPU memory, and the per-row cosine of bf16/fp16 against the released code's
numerics (fp32 weights under fp16 autocast, precision="autocast").

    python scripts/gpu_bench_7b.py [--layers 32] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nvembed_sdk.config import PRESETS, DecoderConfig
from nvembed_sdk.model import NVEmbedModel


def build(layers: int, dtype: torch.dtype) -> NVEmbedModel:
    base = PRESETS["nv-embed-v2"]
    cfg = base.replace(text=DecoderConfig(**{**base.text.__dict__, "num_hidden_layers": layers, "head_dim": None}))
    with torch.device("meta"):
        model = NVEmbedModel(cfg)
    # Sampled in fp32 then cast, so every precision holds the same weights as the fp32 reference
    # (sampling directly in bf16/fp16 draws different numbers).
    model = model.to_empty(device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_q.weight", "norm_kv.weight", "norm_ff.weight",
                              "attn_norm.weight", "mlp_norm.weight")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 1.0 if name.endswith("latents") else 0.02, generator=g)
    model.reset_buffers("cuda")
    return model.to(dtype).eval()


def timed(fn, seconds: float) -> tuple[float, int]:
    fn()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    print("GPU:", torch.cuda.get_device_name(), "torch", torch.__version__)
    results = []
    ref = build(args.layers, torch.float32)  # fp32 weights: the released default load (~31 GB)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (8, 200), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[1::2, 150:] = 0
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        e_ref = ref(ids, mask, mask).float()
    del ref
    torch.cuda.empty_cache()
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = build(args.layers, dtype)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # peak = weights in `dtype` + inference activations
        with torch.inference_mode():
            e = model(ids, mask, mask).float()
            cos = torch.nn.functional.cosine_similarity(e, e_ref, dim=-1)
            row = {"precision": name, "min_cos_vs_autocast": round(float(cos.min()), 6),
                   "finite": bool(torch.isfinite(e).all())}
            for b, t in ((32, 128), (8, 512)):
                x = torch.randint(3, 32000, (b, t), device="cuda")
                m = torch.ones_like(x)
                sec, _ = timed(lambda x=x, m=m, net=model: net(x, m, m), args.seconds)
                row[f"texts_per_s@{b}x{t}"] = round(b / sec, 1)
                row[f"tokens_per_s@{b}x{t}"] = round(b * t / sec)
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        print(json.dumps(row))
        results.append(row)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
