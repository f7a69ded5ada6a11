"""TensorRT engines on a real GPU: build fp16/int8/fp8, parity vs fp32 PyTorch, profiles, refusal.

Runs only where CUDA and TensorRT exist (``scripts/gpu_check.sh``); elsewhere the whole module
is skipped with the reason. The model is the smallest checkpoint under ``models/`` that has
weights, else the tiny random checkpoint of ``tests/conftest.py``. Budgets are DESIGN.md's:
per-row cosine vs fp32 PyTorch >= 0.999 for fp16, >= 0.99 for INT8/FP8.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def quantizer_skip_reason(precision: str) -> str | None:
    """Why an INT8/FP8 engine test cannot run here (ModelOpt makes the Q/DQ bundle), else None.

    Defined before the module-level skip so that tests/unit can check it on a CPU machine.
    """
    if precision not in ("int8", "fp8"):
        return None
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError as exc:
        return (f"{precision.upper()} engines need a Q/DQ bundle from NVIDIA ModelOpt, which is not importable "
                f"({exc}): pip install 'nvembed-sdk[quant]' (nvidia-modelopt[onnx])")
    return None


def _skip_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU visible to torch {torch.__version__} (TensorRT tests need an NVIDIA GPU)"
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"tensorrt is not importable ({exc}): pip install 'nvembed-sdk[tensorrt]' (JetPack on Jetson)"
    return None


_REASON = _skip_reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

import numpy as np  # noqa: E402
import tensorrt as trt  # noqa: E402
import torch  # noqa: E402

from nvembed_sdk import Embedder  # noqa: E402
from nvembed_sdk.errors import ArtifactError, InputError  # noqa: E402
from nvembed_sdk.exporters.trt_build import build_engine, preflight  # noqa: E402
from nvembed_sdk.manifest import sha256_file  # noqa: E402

from conftest import SAMPLE_TEXTS, assert_close_cos  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BUDGET = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.995, "int8": 0.99, "fp8": 0.99}
CC = torch.cuda.get_device_capability()
TRT_MAJOR = int(trt.__version__.split(".")[0])
OPT_LEVEL = 1  # fast builds: these tests check correctness, not tactics


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path) -> Path:
    """The smallest shipped checkpoint with weights (< 2 GB), else the tiny random one."""
    found = []
    for d in sorted((REPO / "models").iterdir()):
        weights = list(d.glob("*.safetensors"))
        if weights and (d / "tokenizer.json").is_file():
            found.append((sum(w.stat().st_size for w in weights), d))
    small = [d for size, d in sorted(found) if size < 2e9]
    return small[0] if small else tiny_checkpoint


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [*SAMPLE_TEXTS, "short", "a b c", "How do I parse command-line options in C?"]


@pytest.fixture(scope="module")
def reference(checkpoint: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """fp32 PyTorch on the CPU: the parity reference, computed here."""
    with Embedder.load(checkpoint, device="cpu", precision="fp32") as e:
        return {"docs": e.embed_documents(texts), "queries": e.embed_queries(texts)}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trt")


def _onnx(checkpoint: Path, work: Path, precision: str) -> Path:
    """An ONNX bundle of ``checkpoint`` in ``precision`` (Q/DQ for int8/fp8), built once per module."""
    out = work / f"onnx-{precision}"
    if (out / "nvembed.json").is_file():
        return out
    if precision in ("int8", "fp8"):
        reason = quantizer_skip_reason(precision)
        if reason:
            pytest.skip(reason)
        quantize = pytest.importorskip("nvembed_sdk.exporters.quantize", reason="the quantiser is not written yet")
        if hasattr(quantize, "export_quantized"):
            return Path(quantize.export_quantized(checkpoint, out, precision=precision))
        if hasattr(quantize, "quantize_bundle"):
            return Path(quantize.quantize_bundle(_onnx(checkpoint, work, "fp32"), out, precision=precision))
        pytest.skip("nvembed_sdk.exporters.quantize has neither export_quantized nor quantize_bundle")
    onnx_export = pytest.importorskip("nvembed_sdk.exporters.onnx_export", reason="the ONNX exporter is missing")
    return Path(onnx_export.export_onnx(checkpoint, out, precision=precision))


def _engine(checkpoint: Path, work: Path, precision: str, onnx_precision: str | None = None, **kw) -> Path:
    onnx_precision = onnx_precision or precision
    out = work / f"engine-{precision}-from-{onnx_precision}{'-' + kw['tag'] if 'tag' in kw else ''}"
    kw.pop("tag", None)
    if (out / "engine.plan").is_file():
        return out
    bundle = _onnx(checkpoint, work, onnx_precision)
    return build_engine(bundle, out, precision=precision, opt_level=OPT_LEVEL,
                        timing_cache=work / "timing.cache", **kw)


def _check_parity(engine_dir: Path, reference: dict[str, np.ndarray], texts: list[str], precision: str) -> None:
    with Embedder.load(engine_dir / "engine.plan") as e:
        assert e.backend == "tensorrt" and e.precision == precision and e.device.startswith("cuda")
        docs, queries = e.embed_documents(texts, batch_size=4), e.embed_queries(texts, batch_size=4)
    assert docs.dtype == np.float32 and docs.shape == reference["docs"].shape
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-3)
    assert_close_cos(docs, reference["docs"], BUDGET[precision])
    assert_close_cos(queries, reference["queries"], BUDGET[precision])


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8"])
def test_build_and_parity(precision, checkpoint, work, reference, texts):
    if precision == "fp8" and CC < (8, 9):
        with pytest.raises(InputError, match=r"8\.9"):
            preflight("fp8", "datacenter")
        pytest.skip(f"FP8 needs compute capability >= 8.9; this GPU is {CC[0]}.{CC[1]} (refusal checked)")
    out = _engine(checkpoint, work, precision)
    m = json.loads((out / "nvembed.json").read_text())
    src = Path(m["source"]["onnx"])
    assert m["kind"] == "tensorrt" and m["precision"] == precision and m["files"] == {"model": "engine.plan"}
    assert m["tensorrt"]["version"] == trt.__version__
    assert m["tensorrt"]["gpu_name"] == torch.cuda.get_device_name()
    assert m["tensorrt"]["compute_capability"] == f"{CC[0]}.{CC[1]}"
    assert m["source"]["onnx_sha256"] == sha256_file(src / "model.onnx")
    assert m["text"]["max_length"] <= max(p["max"][1] for p in m["tensorrt"]["profiles"])
    assert (out / "tokenizer.json").is_file()
    _check_parity(out, reference, texts, precision)


@pytest.mark.skipif(TRT_MAJOR >= 11, reason="TensorRT 11 has no FP16 builder flag (weak typing removed)")
def test_fp16_engine_from_fp32_onnx_weakly_typed(checkpoint, work, reference, texts):
    out = _engine(checkpoint, work, "fp16", onnx_precision="fp32")
    m = json.loads((out / "nvembed.json").read_text())
    assert m["tensorrt"]["strongly_typed"] is False and m["tensorrt"]["builder_flags"] == ["FP16"]
    _check_parity(out, reference, texts, "fp16")


def test_profile_switching_and_batch_splitting(checkpoint, work, reference, texts):
    out = _engine(checkpoint, work, "fp16", tag="profiles", profiles=["1x1:2x16:4x16", "1x1:2x64:4x64"])
    with Embedder.load(out) as e:
        assert e.runner.profiles == [((1, 1), (2, 16), (4, 16)), ((1, 1), (2, 64), (4, 64))]
        assert e.runner.max_length == 64 and e.text.max_length == 64
        lengths = [len(r) for r in e.text.tokenize(texts, "", 10_000)]
        short = [t for t, n in zip(texts, lengths, strict=True) if n <= 16]
        long = [t for t, n in zip(texts, lengths, strict=True) if 16 < n <= 64]
        assert short and long, lengths
        rows = short * 3  # >= 6 rows in one batch > max batch 4: split into ceil(rows / 4) runs
        got_short = e.embed_documents(rows, batch_size=len(rows))
        assert e.runner.profile_hits == [-(-len(rows) // 4), 0]
        got_long = e.embed_documents(long, batch_size=10)
        assert e.runner.profile_hits[1] >= 1
        mixed = e.embed_documents(texts, batch_size=3)  # both profiles, back and forth
        with pytest.raises(InputError, match="max_length <= 64"):
            e.embed_documents([" ".join(SAMPLE_TEXTS)], max_length=200)
    ref = dict(zip(texts, reference["docs"], strict=True))
    assert_close_cos(got_short, np.stack([ref[t] for t in rows]), BUDGET["fp16"])
    assert_close_cos(got_long, np.stack([ref[t] for t in long]), BUDGET["fp16"])
    # Texts longer than 64 tokens are truncated by the Embedder: compare only those that fit.
    fits = [i for i, n in enumerate(lengths) if n <= 64]
    assert_close_cos(mixed[fits], reference["docs"][fits], BUDGET["fp16"])


def test_gpu_mismatch_is_refused(checkpoint, work, texts):
    built = _engine(checkpoint, work, "fp16")
    other = work / "engine-other-gpu"
    shutil.copytree(built, other, dirs_exist_ok=True)
    m = json.loads((other / "nvembed.json").read_text())
    m["tensorrt"]["gpu_name"] = "NVIDIA Imaginary 9000"
    (other / "nvembed.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as err:
        Embedder.load(other / "engine.plan")
    msg = str(err.value)
    assert "NVIDIA Imaginary 9000" in msg and "nvembed-export" in msg and "--to tensorrt" in msg
    m["tensorrt"]["gpu_name"] = torch.cuda.get_device_name()
    m["tensorrt"]["version"] = "9.9.9"
    (other / "nvembed.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="9.9.9"):
        Embedder.load(other)
    with Embedder.load(other, strict=False) as e:  # escape hatch: same plan, recorded version edited
        assert e.embed_documents(texts[:2]).shape == (2, e.dim)


def test_timing_cache_is_written_and_reused(checkpoint, work):
    cache = work / "timing.cache"
    _engine(checkpoint, work, "fp16")
    assert cache.is_file() and cache.stat().st_size > 0
    before = cache.read_bytes()
    out = _engine(checkpoint, work, "fp16", tag="again")
    assert json.loads((out / "nvembed.json").read_text())["tensorrt"]["timing_cache"] == str(cache)
    assert len(cache.read_bytes()) >= len(before)


def test_unusable_timing_cache_builds_with_a_fresh_one(checkpoint, work, monkeypatch, caplog):
    """A cache TensorRT cannot use (garbage here; another GPU's in the field) costs one warning, not the build."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(work / "xdg"))
    bad = work / "foreign.cache"
    bad.write_bytes(b"not a timing cache from this GPU")
    with caplog.at_level("WARNING", logger="nvembed_sdk"):
        out = build_engine(_onnx(checkpoint, work, "fp16"), work / "engine-foreign-cache", precision="fp16",
                           opt_level=OPT_LEVEL, timing_cache=bad)
    assert bad.read_bytes() == b"not a timing cache from this GPU"  # the user's file is kept
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "timing cache" in r.getMessage()]
    assert len(warnings) == 1 and "rejected or unreadable" in warnings[0], warnings
    m = json.loads((out / "nvembed.json").read_text())
    assert m["tensorrt"]["timing_cache_rejected"] == str(bad)
    assert Path(m["tensorrt"]["timing_cache"]).stat().st_size > 0
    assert (out / "engine.plan").stat().st_size == m["tensorrt"]["plan_bytes"]


def test_manifest_records_the_tensorrt_cuda_major(checkpoint, work):
    from nvembed_sdk.runtimes.trt import tensorrt_cuda_major

    m = json.loads((_engine(checkpoint, work, "fp16") / "nvembed.json").read_text())
    found = tensorrt_cuda_major()
    assert m["tensorrt"]["cuda_major"] == found
    if found is not None and torch.version.cuda:  # pip's tensorrt-cuNN wheel vs torch's CUDA: a hint, not a rule
        print(f"TensorRT built for CUDA {found}, torch for CUDA {torch.version.cuda}")


def test_parser_errors_name_the_node(checkpoint, work):
    """A graph TensorRT cannot parse: the error gives the count, the node and its operator."""
    import onnx
    from onnx import TensorProto, helper

    bundle = work / "onnx-unparsable"
    shutil.copytree(_onnx(checkpoint, work, "fp16"), bundle, dirs_exist_ok=True)
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["input_ids"], ["embeddings"], name="bad_node", domain="nvembed.test")], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("nvembed.test", 1)])
    for f in bundle.glob("model.onnx*"):
        f.unlink()
    onnx.save(model, bundle / "model.onnx")
    with pytest.raises(ArtifactError) as err:
        build_engine(bundle, work / "engine-unparsable", precision="fp16", opt_level=OPT_LEVEL, timing_cache=False)
    msg = str(err.value)
    assert "could not parse it: " in msg and " error" in msg and "bad_node" in msg and "NoSuchOp" in msg, msg

