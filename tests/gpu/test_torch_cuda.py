"""The PyTorch backend on CUDA: every precision against fp32 on the CPU, within the README's budget."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXTS, assert_close_cos

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip(f"no CUDA GPU visible to torch {torch.__version__}", allow_module_level=True)

from nvembed_sdk import Embedder  # noqa: E402

BUDGET = {"fp32": 0.99999, "bf16": 0.999, "fp16": 0.999, "autocast": 0.999}
LONG = [" ".join(SAMPLE_TEXTS) * 6]


@pytest.fixture(scope="module")
def cpu_ref(tiny_checkpoint):
    e = Embedder.load(tiny_checkpoint, device="cpu")
    return e.embed(SAMPLE_TEXTS), e.embed(SAMPLE_TEXTS, instruction="Instruct: find it\nQuery: "), e.embed(LONG)


@pytest.mark.parametrize("precision", list(BUDGET))
def test_cuda_precisions_match_cpu_fp32(tiny_checkpoint, cpu_ref, precision):
    e = Embedder.load(tiny_checkpoint, device="cuda", precision=precision)
    assert e.device.startswith("cuda") and e.precision == precision
    assert_close_cos(e.embed(SAMPLE_TEXTS, batch_size=3), cpu_ref[0], BUDGET[precision])
    assert_close_cos(e.embed(SAMPLE_TEXTS, instruction="Instruct: find it\nQuery: "), cpu_ref[1], BUDGET[precision])
    assert_close_cos(e.embed(LONG), cpu_ref[2], BUDGET[precision])


def test_cuda_default_precision_is_fp16(tiny_checkpoint):
    assert Embedder.load(tiny_checkpoint).precision == "fp16"


def test_cuda_threads_share_one_embedder(tiny_checkpoint):
    e = Embedder.load(tiny_checkpoint, device="cuda", precision="fp32")
    ref = e.embed(SAMPLE_TEXTS)
    out: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: out.append(e.embed(SAMPLE_TEXTS))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 4
    for o in out:
        np.testing.assert_allclose(o, ref, atol=1e-5)


def test_onnx_bundle_on_cuda_or_clear_error(tiny_checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from nvembed_sdk import BackendUnavailableError
    from nvembed_sdk.exporters.onnx_export import export_onnx

    bundle = export_onnx(tiny_checkpoint, tmp_path / "b", validate=False)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailableError, match="device='cpu'"):
            Embedder.load(bundle, device="cuda")
        pytest.skip(f"onnxruntime {ort.__version__} here is CPU-only (no CUDAExecutionProvider)")
    e = Embedder.load(bundle, device="cuda")
    assert e.device == "cuda"
    ref = Embedder.load(tiny_checkpoint, device="cpu").embed(SAMPLE_TEXTS)
    assert_close_cos(e.embed(SAMPLE_TEXTS), ref, 0.9999)


def test_shipped_model_on_cuda(cpu_ref):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "models" / "nvembed-debian-small"
    if not (shipped / "model.safetensors").is_file():
        pytest.skip(f"{shipped} has no weights")
    ref = Embedder.load(shipped, device="cpu")
    for precision in ("fp16", "autocast", "bf16"):
        e = Embedder.load(shipped, device="cuda", precision=precision)
        assert_close_cos(e.embed(SAMPLE_TEXTS), ref.embed(SAMPLE_TEXTS), BUDGET[precision])
