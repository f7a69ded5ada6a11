"""Every available backend runs through the same Embedder contract (STYLE habit 15)."""

from __future__ import annotations

import numpy as np
import pytest

from nvembed_sdk import Embedder
from nvembed_sdk.runtimes import available_backends
from nvembed_sdk.runtimes.base import Backend
from nvembed_sdk.text import Batch, TextPipeline

from conftest import SAMPLE_TEXTS, assert_close_cos


class FakeBackend(Backend):
    """Deterministic backend: the embedding is a hash of the pooled token ids."""

    name = "fake"

    def _load(self) -> None:
        self.dim = 16
        self.normalizes_output = False

    def _run(self, batch: Batch) -> np.ndarray:
        out = np.zeros((batch.input_ids.shape[0], self.dim), dtype=np.float32)
        for i, (ids, pool) in enumerate(zip(batch.input_ids, batch.pool_mask, strict=True)):
            for tok in ids[pool.astype(bool)]:
                out[i, int(tok) % self.dim] += 1.0
        return out


@pytest.fixture(scope="module")
def onnx_bundle(tiny_checkpoint, tmp_path_factory):
    if available_backends()["onnxruntime"]:
        pytest.skip(f"onnxruntime unavailable: {available_backends()['onnxruntime']}")
    from nvembed_sdk.exporters.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("contract"), validate=False)


@pytest.fixture(params=["torch", "onnxruntime", "fake"])
def embedder(request, tiny_checkpoint):
    if request.param == "torch":
        return Embedder.load(tiny_checkpoint, device="cpu")
    if request.param == "onnxruntime":
        return Embedder.load(request.getfixturevalue("onnx_bundle"), device="cpu")
    return Embedder(FakeBackend(tiny_checkpoint).load(), TextPipeline(tiny_checkpoint, max_length=64))


def test_contract(embedder):
    out = embedder.embed(SAMPLE_TEXTS, batch_size=3)
    assert out.shape == (len(SAMPLE_TEXTS), embedder.dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # input order is restored after length sorting
    rev = embedder.embed(SAMPLE_TEXTS[::-1], batch_size=3)[::-1]
    assert_close_cos(rev, out, 0.99999)
    assert embedder.embed([]).shape == (0, embedder.dim)
    assert embedder.embed("one text").shape == (embedder.dim,)
    q = embedder.embed_queries(["package number 7"], task="find it")
    d = embedder.embed_documents(["package number 7"])
    assert not np.allclose(q, d)
    with pytest.raises(TypeError):
        embedder.embed([1, 2])
    assert isinstance(embedder.backend, str) and isinstance(embedder.precision, str)


def test_backends_report_reasons():
    reasons = available_backends()
    assert reasons["torch"] is None
    assert reasons["tensorrt"] is None or "pip install -e '.[tensorrt]'" in reasons["tensorrt"]
