from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from nvembed_sdk import ArtifactError, Embedder, InputError
from nvembed_sdk.embedder import query_instruction
from nvembed_sdk.text import TextPipeline

from conftest import SAMPLE_TEXTS, assert_close_cos


@pytest.fixture(scope="module")
def emb(tiny_checkpoint):
    return Embedder.load(tiny_checkpoint, device="cpu")


def test_properties(emb):
    assert emb.backend == "torch" and emb.precision == "fp32" and emb.dim == 64 and emb.device == "cpu"
    assert emb.manifest["model"]["dim"] == 64


def test_matches_model_forward_in_input_order(emb, tiny_checkpoint):
    from nvembed_sdk.checkpoint import load_model

    model = load_model(tiny_checkpoint)
    pipe = TextPipeline(tiny_checkpoint)
    ins = "Instruct: find the package\nQuery: "
    got = emb.embed(SAMPLE_TEXTS, instruction=ins, batch_size=3)  # length-sorted internally
    for i, text in enumerate(SAMPLE_TEXTS):  # one by one, no padding at all
        b = pipe([text], instruction=ins)
        with torch.no_grad():
            ref = model(*(torch.from_numpy(x) for x in (b.input_ids, b.attention_mask, b.pool_mask)))
        assert_close_cos(got[i : i + 1], ref.numpy(), 0.999999)
    assert got.dtype == np.float32 and got.shape == (len(SAMPLE_TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_batch_size_does_not_change_results(emb):
    a = emb.embed(SAMPLE_TEXTS, batch_size=1)
    b = emb.embed(SAMPLE_TEXTS, batch_size=32)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_instruction_changes_pooling(emb):
    a = emb.embed(["package number 7"])
    b = emb.embed_queries(["package number 7"], task="find it")
    c = emb.embed(["package number 7"], instruction=query_instruction("find it"))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(b, c)
    np.testing.assert_array_equal(emb.embed_documents(["package number 7"]), a)


def test_empty_single_and_unnormalised(emb):
    assert emb.embed([]).shape == (0, 64) and emb.embed([]).dtype == np.float32
    one = emb.embed("hello")
    assert one.shape == (64,)
    raw = emb.embed(["hello"], normalize=False)
    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3
    np.testing.assert_allclose(raw[0] / np.linalg.norm(raw), one, rtol=1e-5, atol=1e-6)


def test_truncation(emb):
    long = "package number 7 provides tools " * 100
    a = emb.embed([long], max_length=16)
    b = emb.embed([long + " and more text at the end"], max_length=16)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bad_inputs(emb):
    with pytest.raises(InputError, match=r"texts\[1\]"):
        emb.embed(["ok", None])
    with pytest.raises(InputError, match="batch_size"):
        emb.embed(["ok"], batch_size=0)
    with pytest.raises(InputError, match="instruction"):
        emb.embed(["ok"], instruction=3)


def test_bad_paths(tmp_path, tiny_checkpoint):
    with pytest.raises(ArtifactError, match="does not exist"):
        Embedder.load(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="without config.json"):
        Embedder.load(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ArtifactError, match=r"\.onnx or \.plan"):
        Embedder.load(tmp_path / "x.txt")
    with pytest.raises(ArtifactError, match="export it first"):
        Embedder.load(tiny_checkpoint, backend="onnxruntime")
    with pytest.raises(InputError, match="precision"):
        Embedder.load(tiny_checkpoint, precision="int3")


@pytest.mark.parametrize("precision,min_cos", [("bf16", 0.99), ("fp16", 0.999), ("autocast", 0.999)])
def test_reduced_precisions_on_cpu(tiny_checkpoint, emb, precision, min_cos):
    low = Embedder.load(tiny_checkpoint, device="cpu", precision=precision)
    assert low.precision == precision
    assert_close_cos(low.embed(SAMPLE_TEXTS), emb.embed(SAMPLE_TEXTS), min_cos)


def test_threads_share_one_embedder(emb):
    ref = emb.embed(SAMPLE_TEXTS)
    results: list[np.ndarray] = []

    def work():
        results.append(emb.embed(SAMPLE_TEXTS))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    for r in results:  # issue 13: 8 threads on one Embedder give bit-identical results; keep it so
        assert np.array_equal(r, ref)
