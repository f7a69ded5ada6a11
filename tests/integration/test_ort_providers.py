"""ONNX Runtime providers: a requested CUDA/TensorRT provider that does not start is an error.

ONNX Runtime itself only logs why its CUDA provider failed and runs on the CPU. These tests run
where ``onnxruntime-gpu`` is installed without a usable GPU (this project's CPU machines), so the
CUDA provider is listed as available but cannot start.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from nvembed_sdk.errors import BackendUnavailableError

ort = pytest.importorskip("onnxruntime")


def _cuda_starts() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(_cuda_starts(), reason="a CUDA GPU is visible: the provider would start here")
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest graph with the bundle's I/O: embeddings[b] = sum(input_ids[b]) * ones(4)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["f", "axis"], ["s"], keepdims=1),
             helper.make_node("Mul", ["s", "w"], ["embeddings"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
         for n in ("input_ids", "attention_mask", "pool_mask")],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(np.array([1], np.int64), "axis"),
                     numpy_helper.from_array(np.ones((1, 4), np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    path = tmp_path_factory.mktemp("ort") / "model.onnx"
    onnx.save(proto, path)
    return path


def _load(model: Path, **kw):
    from nvembed_sdk.runtimes.ort import OrtBackend

    return OrtBackend(model, **kw).load()


def test_device_cuda_raises_with_onnxruntimes_reason(model):
    with pytest.raises(BackendUnavailableError) as err:
        _load(model, device="cuda")
    msg = str(err.value)
    assert "\n" not in msg and "device='cpu'" in msg
    if HAS_CUDA_EP:  # onnxruntime-gpu: the provider is listed, fails to start, and ORT said why
        assert "CUDAExecutionProvider | got did not start (ONNX Runtime: " in msg
        assert "no reason logged" not in msg and ("Failed" in msg or "error" in msg.lower()), msg


@pytest.mark.skipif(not HAS_CUDA_EP, reason="this onnxruntime has no CUDAExecutionProvider (CPU build)")
@pytest.mark.parametrize("providers", [
    ["CUDAExecutionProvider", "CPUExecutionProvider"],
    [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"],
])
def test_explicit_gpu_provider_that_does_not_start_raises(model, providers):
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider .*did not start"):
        _load(model, providers=providers)


def test_auto_falls_back_with_one_line_per_process_and_cpu_is_silent(model, caplog, monkeypatch):
    from nvembed_sdk.runtimes import ort as ort_backend

    monkeypatch.setattr(ort_backend, "_fallback_said", False)  # as in a fresh process
    with caplog.at_level(logging.DEBUG, logger="nvembed_sdk"):
        silent = _load(model, device="cpu")
        assert not [r for r in caplog.records if r.name.startswith("nvembed_sdk")]
        first, second = _load(model), _load(model)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("nvembed_sdk")]
    assert len(lines) == 1 and "CPU" in lines[0], lines
    assert silent.device == first.device == second.device == "cpu"  # e.device says where it runs
    ids = np.array([[1, 2, 3], [4, 5, 0]], np.int64)
    out = first.session.run(["embeddings"], {"input_ids": ids, "attention_mask": ids, "pool_mask": ids})[0]
    np.testing.assert_array_equal(out, np.repeat(ids.sum(1, keepdims=True), 4, axis=1).astype(np.float32))
