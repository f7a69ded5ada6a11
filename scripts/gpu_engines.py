"""Engine check for a machine with TensorRT (called by ``scripts/gpu_check.sh``; about 3-4 min on an H100/H200).

Part 1, the shipped model (models/nvembed-debian-small):
  * export every bundle kind (fp32, fp16, INT8 for onnxruntime, INT8 and FP8 for TensorRT) and
    parse each with TensorRT's ONNX parser;
  * build fp16 / INT8 / FP8 engines with two profiles (1x1:8x128:32x128 and 1x1:4x512:8x512);
  * dump the engine inspector's per-layer precisions: INT8/FP8 GEMMs and fp16 elsewhere;
  * parity against fp32 PyTorch at odd batch sizes (1, 3, 7) and a text truncated at max length;
  * a rejected timing cache (random bytes): the build must warn and finish, not crash;
  * build time, plan size, device memory and texts/s at 32 x 128 and 8 x 512 against fp16.
Part 2, the NV-Embed-v2 shape (hidden 4096, 32 heads / 8 KV heads, MLP 14336, 512 latents) with
``--layers`` decoder layers (default 2, random weights, so 5 minutes hold): fp16 vs INT8 vs FP8
engines, texts/s and per-row cosine vs fp32 PyTorch.

    python scripts/gpu_engines.py [--part 1|2|all] [--layers 2] [--out /tmp/nvembed-gpu]
    python scripts/gpu_engines.py --part prepare --out shared/gpu-bundles   # CPU: export part 1's bundles ahead
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "nvembed-debian-small"
PROFILES = ["1x1:8x128:32x128", "1x1:4x512:8x512"]
BUDGET = {"fp16": 0.999, "int8": 0.99, "fp8": 0.99}


def log(*a: object) -> None:
    print(*a, flush=True)


def layer_precisions(bundle: Path) -> dict[str, int]:
    """Engine inspector: count of layers per (layer type, output precision); GEMM lines printed."""
    import tensorrt as trt

    rt = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = rt.deserialize_cuda_engine((bundle / "engine.plan").read_bytes())
    insp = engine.create_engine_inspector()
    info = json.loads(insp.get_engine_information(trt.LayerInformationFormat.JSON))
    counts: dict[str, int] = {}
    for layer in info.get("Layers", []):
        if isinstance(layer, str):
            continue
        kind = str(layer.get("LayerType", "?"))
        outs = layer.get("Outputs") or [{}]
        fmt = str(outs[0].get("Format/Datatype", "?"))
        dtype = next((d for d in ("Int8", "FP8", "Half", "Float", "BF16") if d.lower() in fmt.lower()), fmt[:20])
        key = f"{kind}:{dtype}"
        counts[key] = counts.get(key, 0) + 1
        if any(k in kind.lower() for k in ("gemm", "matrixmultiply", "convolution", "mha", "myelin")):
            tactic = str(layer.get("TacticName", ""))[:60]
            log(f"    {layer.get('Name', '?')[:70]:70s} {kind:18s} {fmt[:40]:40s} {tactic}")
    return counts


def throughput(bundle: Path, batch: int, seq: int, seconds: float = 3.0) -> tuple[float, float]:
    """(texts/s, device MiB in use once the engine is loaded and has run this shape).

    The memory is the drop in the device's free memory (``cudaMemGetInfo``): TensorRT allocates the
    engine's weights and activation memory itself, which torch's allocator statistics never see.
    """
    from nvembed_sdk import Embedder

    text = " ".join(["word"] * (seq * 2))  # truncated to seq tokens
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    with Embedder.load(bundle, max_length=seq) as e:
        texts = [text] * batch
        e.embed(texts, batch_size=batch)
        torch.cuda.synchronize()
        used = (free0 - torch.cuda.mem_get_info()[0]) / 2**20
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            e.embed(texts, batch_size=batch)
            n += batch
        return n / (time.perf_counter() - t0), used


def parity(checkpoint: Path, bundle: Path, texts: list[str]) -> float:
    from nvembed_sdk import Embedder

    with Embedder.load(checkpoint, device="cpu", precision="fp32") as ref, Embedder.load(bundle) as cand:
        worst = 1.0
        for bs in (1, 3, 7):
            a, b = ref.embed(texts[:bs], batch_size=bs), cand.embed(texts[:bs], batch_size=bs)
            worst = min(worst, float((a * b).sum(-1).min()))
        long = [" ".join(texts) * 20]
        a, b = ref.embed(long), cand.embed(long)
        return min(worst, float((a * b).sum(-1).min()))


BUNDLE_KINDS = {"fp32": dict(precision="fp32"), "fp16": dict(precision="fp16"),
                "int8-ort": dict(precision="int8", runtime="onnxruntime"),
                "int8-trt": dict(precision="int8", runtime="tensorrt"),
                "fp8-trt": dict(precision="fp8", runtime="tensorrt")}


def shipped_bundle(out: Path, name: str) -> Path:
    """``out/onnx-NAME``: exported here unless an earlier ``--part prepare`` (any machine, no GPU) left it.

    The three quantised exports calibrate on the CPU (about 30-90 s each on 2 cores): preparing them
    before a device session keeps part 1 inside its time. Exported without validation: part 1 checks
    the engines built from them against fp32 PyTorch itself.
    """
    from nvembed_sdk.exporters.pipeline import export
    from nvembed_sdk.exporters.quantize import QUANT_PRECISIONS
    from nvembed_sdk.manifest import MANIFEST, read_manifest

    path, kind = out / f"onnx-{name}", BUNDLE_KINDS[name]
    if (path / MANIFEST).is_file() and read_manifest(path).get("precision") == kind["precision"]:
        return path
    calibration = {"calibration_size": 128} if kind["precision"] in QUANT_PRECISIONS else {}  # refused for fp32/fp16
    return export(SHIPPED, path, to="onnx", validate=False, overwrite=True, **calibration, **kind)


def prepare(out: Path) -> bool:
    for name in BUNDLE_KINDS:
        t0 = time.perf_counter()
        log(f"  prepared {shipped_bundle(out, name)} in {time.perf_counter() - t0:.1f} s")
    return True


def part1(out: Path) -> bool:
    import tensorrt as trt

    from nvembed_sdk.textsets import default_texts

    log(f"== part 1: {SHIPPED.name}, TensorRT {trt.__version__}, {torch.cuda.get_device_name()}")
    texts = default_texts("validation")[:16]
    ok = True
    bundles = {}
    for name in BUNDLE_KINDS:
        t0 = time.perf_counter()
        bundles[name] = shipped_bundle(out, name)
        network = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_network(0)
        parser = trt.OnnxParser(network, trt.Logger(trt.Logger.WARNING))
        parsed = parser.parse_from_file(str(bundles[name] / "model.onnx"))
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        log(f"  export+parse {name:9s} {time.perf_counter() - t0:5.1f} s  parsed={parsed} {errs[:2]}")
        ok &= bool(parsed)
    cache = out / "bad.cache"
    cache.write_bytes(np.random.default_rng(0).bytes(4096))
    rows = []
    for prec, src in (("fp16", "fp16"), ("int8", "int8-trt"), ("fp8", "fp8-trt")):
        if prec == "fp8" and torch.cuda.get_device_capability() < (8, 9):
            log("  fp8: skipped (compute capability < 8.9)")
            continue
        from nvembed_sdk.exporters.trt_build import build_engine

        t0 = time.perf_counter()
        try:
            eng = build_engine(bundles[src], out / f"trt-{prec}", precision=prec, profiles=PROFILES, opt_level=3,
                               timing_cache=cache if prec == "fp16" else False)
        except Exception as exc:  # report and go on: one failing precision must not hide the others
            log(f"  build {prec}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            ok = False
            continue
        secs = time.perf_counter() - t0
        if prec == "fp16":
            log("  rejected timing cache: build finished (a warning above says it was unusable)")
        log(f"  {prec} engine: per-layer precisions")
        counts = layer_precisions(eng)
        log(f"    counts {counts}")
        cos = parity(SHIPPED, eng, texts)
        (t128, mem128), (t512, mem512) = throughput(eng, 32, 128), throughput(eng, 8, 512)
        size = (eng / "engine.plan").stat().st_size / 2**20
        passed = cos >= BUDGET[prec]
        ok &= passed
        rows.append(dict(precision=prec, build_s=round(secs, 1), plan_mib=round(size, 1),
                         device_mib=round(max(mem128, mem512)), texts_s_32x128=round(t128),
                         texts_s_8x512=round(t512), min_cos=round(cos, 5), ok=passed))
        log(f"  {rows[-1]}")
    base = next((r for r in rows if r["precision"] == "fp16"), None)
    for r in rows:
        if base:
            log(f"  {r['precision']}: {r['texts_s_32x128'] / base['texts_s_32x128']:.2f}x fp16 at 32x128, "
                f"{r['texts_s_8x512'] / base['texts_s_8x512']:.2f}x at 8x512")
    return ok


def part2(out: Path, layers: int) -> bool:
    from nvembed_sdk.checkpoint import save_model
    from nvembed_sdk.config import PRESETS, DecoderConfig
    from nvembed_sdk.exporters.pipeline import export
    from nvembed_sdk.model import NVEmbedModel
    from nvembed_sdk.textsets import default_texts

    log(f"== part 2: NV-Embed-v2 shape with {layers} layers (random weights)")
    base = PRESETS["nv-embed-v2"]
    cfg = base.replace(text=DecoderConfig(**{**base.text.__dict__, "num_hidden_layers": layers, "head_dim": None,
                                             "vocab_size": 32000}))
    ckpt = out / "v2-shape"
    torch.manual_seed(0)
    model = NVEmbedModel(cfg).init_weights(seed=0).eval()
    save_model(model, ckpt)
    del model
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = REPO.parent / "shared" / "reference" / "nv-embed-v2" / f
        if src.is_file():
            shutil.copy(src, ckpt / f)
    texts = default_texts("validation")[:16]
    ok = True
    rows = []
    for prec in ("fp16", "int8", "fp8"):
        t0 = time.perf_counter()
        try:
            calibration = {"calibration_size": 32} if prec != "fp16" else {}  # refused for fp16
            eng = export(ckpt, out / f"v2-{prec}", to="tensorrt", precision=prec, profiles=PROFILES, opt_level=2,
                         timing_cache=False, force=True, **calibration)
        except Exception as exc:
            log(f"  {prec}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            ok = False
            continue
        cos = parity(ckpt, eng, texts)
        rows.append(dict(precision=prec, export_build_s=round(time.perf_counter() - t0, 1),
                         plan_mib=round((eng / "engine.plan").stat().st_size / 2**20),
                         texts_s_32x128=round(throughput(eng, 32, 128, 2.0)[0]),
                         texts_s_8x512=round(throughput(eng, 8, 512, 2.0)[0]), min_cos=round(cos, 5)))
        log(f"  {rows[-1]}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=["1", "2", "all", "prepare"],
                    help="prepare: only export part 1's ONNX bundles into --out (no GPU or TensorRT needed)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.part == "prepare":
        if not args.out:
            ap.error("--part prepare needs --out (the folder part 1 will read)")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        raise SystemExit(0 if prepare(Path(args.out)) else 1)
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        log(f"tensorrt is not importable ({exc}): engine checks NOT run")
        raise SystemExit(5) from None
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="nvembed-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    ok = True
    if args.part in ("1", "all"):
        ok &= part1(out)
    if args.part in ("2", "all"):
        ok &= part2(out, args.layers)
    log("ENGINE CHECKS", "PASS" if ok else "FAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
