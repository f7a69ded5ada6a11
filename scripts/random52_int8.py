"""INT8 on the issue-12 "new user" checkpoint: NV-Embed-shaped, random weights N(0, 0.08).

Usage:
    python scripts/random52_int8.py [--output DIR] [--tokenizer models/nvembed-debian-small]
        [--calibration-size 256] [--runtime onnxruntime --runtime tensorrt]

Shape: hidden 512, 8 layers, 8 heads / 2 K/V heads, MLP 1,536, 512 latents x 8 heads x 512
(the parameter count depends on the tokenizer's vocabulary: ~52 M with a 32k one, ~40 M with
the shipped model's 8k). The checkpoint is built by ``nvembed_sdk.checkpoint.random_checkpoint``
and exported by ``nvembed_sdk.exporters.pipeline.export`` (INT8, with the sensitivity fallback,
``force`` so the figures print even outside the budget); this script prints, per runtime graph,
the min per-row cosine and top-10 agreement against fp32 PyTorch on the held-out validation
text, the simulated min cosine, the sensitivity ranking and the projections the fallback kept.
Minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from nvembed_sdk.checkpoint import random_checkpoint
from nvembed_sdk.config import DecoderConfig, LatentAttentionConfig, NVEmbedConfig
from nvembed_sdk.exporters.pipeline import export
from nvembed_sdk.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]

SHAPE = NVEmbedConfig(
    text=DecoderConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.08),
    latent=LatentAttentionConfig(num_latents_value=512, num_cross_heads=8, cross_dim_head=512, latent_dim=512,
                                 hidden_dim=512),
    max_length=512, torch_dtype="float32",
)


def report(bundle: Path, runtime: str) -> None:
    m = read_manifest(bundle)
    v, q = m["validation"], m["quantization"]
    fb = q.get("fallback", {})
    print(f"\n== int8, --runtime {runtime}: {'PASS' if v['passed'] else 'FAIL'}")
    print(f"min per-row cosine {v['min_cosine']:.5f}  top-10 agreement {v['topk_agreement']:.3f}  "
          f"(budget 0.99 / 0.9)  simulated {q['simulated_min_cosine']}")
    if q.get("o_proj_range"):
        print(f"o_proj range headroom: {q['o_proj_range']['headroom']}  tried {q['o_proj_range']['tried']}")
    if fb:
        print(f"simulated with every projection INT8: {fb.get('simulated_min_cosine_all_quantized')}, "
              f"target {fb['target']}")
        print("sensitivity (costliest first):")
        for r in fb["sensitivity"][:10]:
            print(f"  {r['projection']}: min cosine {r['min_cosine_if_kept']:.5f} if kept (+{r['gain']:.5f})")
        print(f"fallback kept ({fb['dtype']}): {len(fb['kept_high_precision'])} of {len(fb['sensitivity'])}: {fb['kept_high_precision']}")
    else:
        print("simulation within target: no fallback, nothing kept")
    if "decoder_gemm_macs" in m.get("graph", {}):
        print(f"decoder GEMM MACs by dtype: {m['graph']['decoder_gemm_macs']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--tokenizer", type=Path, default=REPO / "models" / "nvembed-debian-small")
    ap.add_argument("--calibration-size", type=int, default=None)
    ap.add_argument("--runtime", action="append", choices=["onnxruntime", "tensorrt"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.output or Path(tmp)
        ckpt = random_checkpoint(SHAPE, root / "random52", args.tokenizer, seed=args.seed)
        n = sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) // 4
        print(f"checkpoint {ckpt}: ~{n / 1e6:.1f} M parameters (fp32), tokenizer {args.tokenizer}")
        for runtime in args.runtime or ["onnxruntime", "tensorrt"]:
            t0 = time.perf_counter()
            out = export(ckpt, root / f"int8-{runtime}", to="onnx", precision="int8", runtime=runtime,
                         calibration_size=args.calibration_size, force=True, overwrite=True)
            report(out, runtime)
            print(f"export took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
