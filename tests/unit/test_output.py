"""Embedding output options: stored-range int8/uint8, binary packing, declared truncation widths."""

from __future__ import annotations

import numpy as np
import pytest

from nvembed_sdk.errors import ArtifactError, InputError
from nvembed_sdk.output import OUTPUT_FILE, OutputSpec, apply, calibrate, quantize, truncate


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _spec(calib: np.ndarray, dims: tuple[int, ...] = ()) -> OutputSpec:
    ranges = {calib.shape[1]: np.stack([calib.min(0), calib.max(0)])}
    for w in dims:
        part = truncate(calib, w, OutputSpec(truncate_dims=dims))
        ranges[w] = np.stack([part.min(0), part.max(0)])
    return OutputSpec(ranges, dims)


def test_int8_uses_stored_ranges_not_the_batch():
    rng = np.random.default_rng(0)
    spec = _spec(_unit(rng, 500, 16))
    batch = _unit(rng, 7, 16)
    whole = quantize(batch, "int8", spec)
    alone = np.concatenate([quantize(batch[i : i + 1], "int8", spec) for i in range(7)])
    assert whole.dtype == np.int8 and whole.shape == (7, 16)
    np.testing.assert_array_equal(whole, alone)  # a text's code does not depend on its neighbours
    # The bucket rule: 256 equal steps between the stored min and max, clipped.
    lo, hi = spec.ranges[16]
    expect = np.clip(np.floor((batch - lo) / ((hi - lo) / 255)), 0, 255)
    np.testing.assert_array_equal(quantize(batch, "uint8", spec), expect.astype(np.uint8))
    np.testing.assert_array_equal(whole, (expect - 128).astype(np.int8))


def test_out_of_range_values_clip_and_binary_packs_signs():
    spec = OutputSpec({4: np.array([[-0.5] * 4, [0.5] * 4], np.float32)})
    x = np.array([[-2.0, 2.0, 0.0, 0.49]], np.float32)
    np.testing.assert_array_equal(quantize(x, "uint8", spec), [[0, 255, 127, 252]])
    y = np.array([[1, -1, 1, -1, 1, -1, 1, -1, 1]], np.float32)  # 9 dims -> 2 bytes
    ub = quantize(y, "ubinary", OutputSpec())
    assert ub.dtype == np.uint8 and ub.tolist() == [[0b10101010, 0b10000000]]
    assert quantize(y, "binary", OutputSpec()).tolist() == [[0b10101010 - 128, 0b10000000 - 128]]


def test_int8_without_ranges_and_unknown_precision_refuse():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(InputError, match="nvembed calibrate"):
        quantize(x, "int8", OutputSpec())
    with pytest.raises(InputError, match="one of"):
        quantize(x, "fp8", OutputSpec())


def test_truncate_only_at_declared_widths():
    rng = np.random.default_rng(1)
    x = _unit(rng, 3, 16)
    with pytest.raises(InputError, match="declares truncate_dims none"):
        truncate(x, 8, OutputSpec())
    spec = _spec(_unit(rng, 200, 16), dims=(8, 4))
    t = truncate(x, 8, spec)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(t, x[:, :8] / np.linalg.norm(x[:, :8], axis=1, keepdims=True), rtol=1e-6)
    assert apply(x, spec, "int8", 4).shape == (3, 4)  # the 4-wide ranges are used
    assert truncate(x, 16, OutputSpec()) is x  # the full width needs no declaration


def test_spec_round_trip_and_bad_file(tmp_path):
    spec = _spec(_unit(np.random.default_rng(2), 50, 8), dims=(4,))
    spec.write(tmp_path)
    back = OutputSpec.read(tmp_path)
    assert back.truncate_dims == (4,) and sorted(back.ranges) == [4, 8]
    np.testing.assert_allclose(back.ranges[8], spec.ranges[8], rtol=1e-6)
    assert OutputSpec.read(tmp_path / "missing").ranges == {}
    (tmp_path / OUTPUT_FILE).write_text('{"ranges": {"8": {"min": [1, 2], "max": [0, 0]}}}')
    with pytest.raises(ArtifactError, match="ranges\\[8\\]"):
        OutputSpec.read(tmp_path)


def test_calibrate_a_checkpoint(tiny_checkpoint):
    from nvembed_sdk import Embedder

    from conftest import SAMPLE_TEXTS

    e = Embedder.load(tiny_checkpoint, device="cpu")
    spec = calibrate(e, SAMPLE_TEXTS, truncate_dims=[e.dim // 2])
    both = np.concatenate([e.embed_documents(SAMPLE_TEXTS), e.embed_queries(SAMPLE_TEXTS)])
    np.testing.assert_allclose(spec.ranges[e.dim], [both.min(0), both.max(0)], rtol=1e-6)
    assert spec.truncate_dims == (e.dim // 2,) and spec.calibration["texts"] == len(SAMPLE_TEXTS)
    codes = quantize(both, "uint8", spec)  # calibration texts land inside their own buckets
    assert codes.min() == 0 and codes.max() == 255
    with pytest.raises(InputError, match="widths in"):
        calibrate(e, SAMPLE_TEXTS, truncate_dims=[e.dim + 1])
