"""Quantised graphs per runtime target: graph audit of the TensorRT-bound INT8/FP8 graphs, outlier-safe
INT8 on a checkpoint with massive-activation channels, the sensitivity fallback, and ``nvembed info``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SAMPLE_TEXTS, assert_close_cos

onnx = pytest.importorskip("onnx", reason="needs the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("modelopt.onnx.quantization", reason="needs the quant extra: pip install -e '.[quant]'")

from nvembed_sdk import Embedder  # noqa: E402
from nvembed_sdk.cli import main  # noqa: E402
from nvembed_sdk.exporters.audit import audit_graph  # noqa: E402
from nvembed_sdk.exporters.pipeline import export  # noqa: E402
from nvembed_sdk.exporters.qdq import weight_matmuls  # noqa: E402
from nvembed_sdk.manifest import read_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "nvembed-debian-small"


def assert_tensorrt_graph(bundle: Path, precision: str, strict_macs: bool = True) -> dict:
    """The done-when audit: fp16 outside the islands, >= 95 % of decoder GEMM MACs quantised, in budget."""
    m = read_manifest(bundle)
    assert m["plan"]["runtime"] == "tensorrt" and m["plan"]["base_dtype"] == "fp16"
    audit = audit_graph(bundle)  # measured again here, not read from the manifest
    assert audit["fp32_outside_islands"] == [], audit["fp32_outside_islands"][:5]
    assert set(audit["activation_bytes"]) <= {"fp16", "fp32", precision}
    q = m["quantization"]
    kept = q.get("fallback", {}).get("kept_high_precision", [])
    assert len(q["quantized_matmuls"]) == 7 * m["model"]["num_hidden_layers"] - len(kept)
    assert len(weight_matmuls(onnx.load(str(bundle / "model.onnx")).graph)) == len(kept)  # fp16 weights left
    if strict_macs:
        assert audit["decoder_gemm_macs"].get(precision, 0) >= 0.95, (audit["decoder_gemm_macs"], kept)
    assert audit == {k: m["graph"][k] for k in audit}  # what `nvembed info` prints is what the graph holds
    model = onnx.load(str(bundle / "model.onnx"))
    # fp32 initialisers are only scalars and vectors (eps, scale, mask fill, RoPE frequencies, the
    # head's LayerNorm parameters); every float matrix is fp16 (or stored quantised behind a DQ)
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            assert len(t.dims) <= 1, (t.name, list(t.dims))
    v = m["validation"]
    assert v["passed"] and v["min_cosine"] >= 0.99 and v["topk_agreement"] >= 0.9
    return audit


class _Bundles(dict):
    """Exported on first use, once per module."""

    def __init__(self, checkpoint: Path, root: Path) -> None:
        super().__init__()
        self.checkpoint, self.root = checkpoint, root

    def __missing__(self, p: str) -> Path:
        self[p] = export(self.checkpoint, self.root / p, to="onnx", precision=p, runtime="tensorrt",
                         calibration_size=64)
        return self[p]

    def items(self):  # type: ignore[override]
        return [(p, self[p]) for p in ("int8", "fp8")]


@pytest.fixture(scope="module")
def trt_bundles(tiny_checkpoint, tmp_path_factory):
    return _Bundles(tiny_checkpoint, tmp_path_factory.mktemp("trtgraphs"))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tensorrt_graph_audit_released_format(trt_bundles, precision):
    assert_tensorrt_graph(trt_bundles[precision], precision)  # >= 95 % of the decoder GEMM MACs quantised


def test_audit_reports_fp32_inside_attention_outside_the_score_chain(trt_bundles, tmp_path):
    """Only the QKᵀ -> scale -> mask add -> softmax chain may be fp32 inside an attention block: an fp32
    round trip spliced into the RoPE (a Mul in the same attention scope) is reported, not excused."""
    import onnx
    from onnx import TensorProto, helper

    from nvembed_sdk.exporters.audit import _scope, score_chain

    proto = onnx.load(str(trt_bundles["int8"] / "model.onnx"))
    assert audit_graph(trt_bundles["int8"])["fp32_outside_islands"] == []
    nodes = list(proto.graph.node)
    chain = score_chain(nodes)
    rope = next(n for n in nodes if n.op_type == "Mul" and ".attn'" in _scope(n) and n.output[0] not in chain)
    out = rope.output[0]
    up = helper.make_node("Cast", [out], [out + "_f32"], to=TensorProto.FLOAT, name=rope.name + "_up")
    down = helper.make_node("Cast", [out + "_f32"], [out + "_f16"], to=TensorProto.FLOAT16, name=rope.name + "_down")
    for n in (up, down):
        n.metadata_props.extend(rope.metadata_props)  # the same attention scope as the RoPE Mul
    for n in nodes:
        for i, name in enumerate(n.input):
            if name == out:
                n.input[i] = out + "_f16"
    at = nodes.index(rope) + 1
    proto.graph.node.insert(at, down)
    proto.graph.node.insert(at, up)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    outside = audit_graph(tmp_path / "model.onnx")["fp32_outside_islands"]
    assert len(outside) == 1 and outside[0].startswith(out + "_f32 (Cast"), outside


def test_o_proj_range_widened_towards_v_bound(trt_bundles):
    """The tiny model's held-out text holds a long run of one token: its attention output sits at the
    V scale, far past the o_proj inputs' calibrated range. Widening those ranges towards the V bound
    (never clipped) keeps every o_proj in INT8 instead of the fallback keeping them fp16."""
    q = read_manifest(trt_bundles["int8"])["quantization"]
    rng = q["o_proj_range"]
    assert rng["headroom"] in (0.25, 0.5, 0.75, 1.0)
    assert rng["tried"][str(rng["headroom"])] >= q["simulated_min_cosine"] - 1e-5
    assert not [k for k in q.get("fallback", {}).get("kept_high_precision", []) if k.endswith("o_proj")]
    assert len(q["quantized_matmuls"]) == 14


def test_tensorrt_graph_runs_on_ort_cpu(trt_bundles, tiny_checkpoint):
    ref = Embedder.load(tiny_checkpoint, device="cpu").embed(SAMPLE_TEXTS)
    for p, bundle in trt_bundles.items():
        e = Embedder.load(bundle, device="cpu")
        assert e.precision == p and e.emulated == (p == "fp8")
        assert_close_cos(e.embed(SAMPLE_TEXTS), ref, 0.99)


def test_info_prints_dtype_shares(trt_bundles):
    res = CliRunner().invoke(main, ["info", str(trt_bundles["int8"])])
    assert res.exit_code == 0, res.output
    assert "for tensorrt (fp16 base)" in res.output
    line = next(x for x in res.output.splitlines() if x.startswith("MACs by dtype"))
    assert "int8" in line and "fp16" in line and "%" in line
    assert "activation bytes by dtype" in res.output


def _massive_checkpoint(tiny_model, tiny_checkpoint, root: Path) -> Path:
    """NV-Embed-shaped (GQA, SwiGLU, latent head) with massive-activation channels in the residual stream.

    Three fixed hidden dimensions of the residual stream are about 100x larger than the rest for
    every token (what Mistral-7B's decoders show after the first layers: the token embeddings and
    layer 0's down_proj write them), so every RMSNorm output, hence every q/k/v and gate/up
    input, carries those outliers.
    """
    import torch

    from nvembed_sdk.checkpoint import save_model

    with torch.no_grad():
        for c in (3, 17, 42):
            tiny_model.decoder.embed_tokens.weight[:, c] = 2.0 + 0.1 * tiny_model.decoder.embed_tokens.weight[:, c]
            tiny_model.decoder.layers[0].mlp.down_proj.weight[c] *= 100.0
    out = root / "massive"
    save_model(tiny_model, out)
    for f in tiny_checkpoint.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def massive(tiny_model_session, tiny_checkpoint, tmp_path_factory):
    import copy

    return _massive_checkpoint(copy.deepcopy(tiny_model_session), tiny_checkpoint, tmp_path_factory.mktemp("mass"))


def test_int8_keeps_budget_with_massive_activations(massive, tmp_path):
    out = export(massive, tmp_path / "int8", to="onnx", precision="int8", runtime="tensorrt", calibration_size=64)
    m = read_manifest(out)
    smoothing = m["quantization"]["smoothing"]["per_layer"]
    # the outliers were there on layer 1's q/k/v and gate/up inputs, and smoothing flattened them
    assert smoothing["1.qkv"]["outlier_ratio_before"] > 10
    assert smoothing["1.qkv"]["outlier_ratio_after"] < smoothing["1.qkv"]["outlier_ratio_before"] / 3
    assert smoothing["1.qkv"]["alpha"] is not None and smoothing["1.gate_up"]["alpha"] is not None
    assert m["validation"]["passed"] and m["validation"]["min_cosine"] >= 0.99
    # the massive channels sit in the q/k/v and gate/up inputs: smoothing, not the fallback, holds those
    kept = m["quantization"].get("fallback", {}).get("kept_high_precision", [])
    assert not [k for k in kept if k.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))], kept
    assert_tensorrt_graph(out, "int8", strict_macs=False)


def test_int8_for_onnxruntime_keeps_budget_with_massive_activations(massive, tmp_path):
    """The default INT8 graph (fp32 base, ModelOpt Q/DQ, ONNX Runtime's CPU kernels) on the same checkpoint."""
    out = export(massive, tmp_path / "int8-ort", to="onnx", precision="int8", calibration_size=64)
    m = read_manifest(out)
    assert m["plan"]["runtime"] == "onnxruntime"
    smoothing = m["quantization"]["smoothing"]["per_layer"]
    assert smoothing["1.qkv"]["outlier_ratio_after"] < smoothing["1.qkv"]["outlier_ratio_before"] / 3
    assert m["validation"]["passed"] and m["validation"]["min_cosine"] >= 0.99
    assert m["validation"]["topk_agreement"] >= 0.9
    kept = m["quantization"].get("fallback", {}).get("kept_high_precision", [])
    assert not [k for k in kept if k.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))], kept


def test_fp8_smooths_massive_activations_too(massive, tmp_path):
    """FP8 E4M3 has the range for the massive channels but not the resolution beside them under one
    per-tensor scale: the FP8 export smooths on its own grid, as the INT8 one does on INT8's.

    ``force``: this random checkpoint's embeddings are near-identical (per-row cosine 0.99998 after
    FP8), so its top-10 agreement is ranking noise (0.83 smoothed, 0.77 without) and fails the
    0.9 gate either way; the cosine gate is what the smoothing must keep."""
    out = export(massive, tmp_path / "fp8", to="onnx", precision="fp8", runtime="tensorrt", calibration_size=64,
                 force=True)
    m = read_manifest(out)
    smoothing = m["quantization"]["smoothing"]["per_layer"]
    assert smoothing["1.qkv"]["alpha"] is not None
    assert smoothing["1.qkv"]["outlier_ratio_after"] < smoothing["1.qkv"]["outlier_ratio_before"] / 3
    assert m["validation"]["min_cosine"] >= 0.99
    kept = m["quantization"].get("fallback", {}).get("kept_high_precision", [])
    assert not [k for k in kept if k.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))], kept


def _strict_budget(monkeypatch, budget: float) -> None:
    """The export's budget (what the simulation must clear) at ``budget`` with no margin; the
    held-out validation keeps the real 0.99. The all-quantised simulation then misses the budget
    itself, so the fallback is chosen on the simulation (no all-quantised trial first)."""
    from nvembed_sdk.exporters import quantize
    from nvembed_sdk.parity import Tolerance, tolerance_for

    monkeypatch.setattr(quantize, "tolerance_for", lambda p: Tolerance(budget, tolerance_for(p).min_topk))
    monkeypatch.setattr(quantize, "SIMULATED_MARGIN", 0.0)


def test_sensitivity_fallback_keeps_fewest_projections(tiny_checkpoint, tmp_path, monkeypatch):
    """With every projection INT8 the tiny model simulates at min cosine ~0.99986; a stricter budget
    (0.9999) makes it miss, and the export ranks the projections and keeps the fewest costly ones
    in fp16, saying which, and then passes."""
    _strict_budget(monkeypatch, 0.9999)
    out = export(tiny_checkpoint, tmp_path / "int8", to="onnx", precision="int8", runtime="tensorrt",
                 calibration_size=64)
    m = read_manifest(out)
    q = m["quantization"]
    fb = q["fallback"]
    kept = fb["kept_high_precision"]
    assert kept and fb["dtype"] == "fp16"
    assert kept == [r["projection"] for r in fb["sensitivity"][: len(kept)]]  # costliest first, fewest that work
    gains = [r["gain"] for r in fb["sensitivity"]]
    assert gains == sorted(gains, reverse=True)
    assert fb["simulated_min_cosine"] >= fb["target"] == 0.9999
    assert len(q["quantized_matmuls"]) == 14 - len(kept)
    assert m["validation"]["passed"]


def test_within_the_margin_the_all_quantised_graph_is_validated_first(tiny_checkpoint, tmp_path, monkeypatch):
    """The all-INT8 simulation (~0.99986) clears the 0.99 budget but not a 0.0099 margin (target
    0.9999): the fully quantised graph is built first and the held-out validation decides. It
    passes, so the bundle keeps every projection INT8 and says why; the ranking is still recorded."""
    from nvembed_sdk.exporters import quantize

    monkeypatch.setattr(quantize, "SIMULATED_MARGIN", 0.0099)
    out = export(tiny_checkpoint, tmp_path / "int8", to="onnx", precision="int8", runtime="tensorrt",
                 calibration_size=64)
    m = read_manifest(out)
    fb = m["quantization"]["fallback"]
    assert fb["simulated_min_cosine_all_quantized"] < fb["target"] == 0.9999  # the simulation alone would fall back
    assert fb["kept_high_precision"] == [] and len(m["quantization"]["quantized_matmuls"]) == 14
    first = fb["all_quantized_first"]
    assert first["bundle_holds"] == "all quantised"
    assert first["validation_min_cosine"] == pytest.approx(m["validation"]["min_cosine"], abs=1e-5)
    assert m["validation"]["passed"] and len(fb["sensitivity"]) == 14
    assert audit_graph(out)["decoder_gemm_macs"].get("int8") == 1.0


def test_within_the_margin_a_failed_all_quantised_graph_falls_back(tiny_checkpoint, tmp_path, monkeypatch):
    """Same margin, but a validation budget the all-INT8 graph misses and the fallback graph meets
    (between their two measured min cosines): the export builds both, ships the fallback and
    records the all-quantised figure that sent it there."""
    import nvembed_sdk.exporters.validate as validate
    from nvembed_sdk.exporters import quantize
    from nvembed_sdk.parity import Tolerance

    monkeypatch.setattr(quantize, "SIMULATED_MARGIN", 0.0099)
    ref = tmp_path / "ref"  # measure both graphs' held-out min cosines first
    all_q = read_manifest(export(tiny_checkpoint, ref / "all", to="onnx", precision="int8", runtime="tensorrt",
                                 calibration_size=64))
    ranking = [r["projection"] for r in all_q["quantization"]["fallback"]["sensitivity"]]
    lo = all_q["validation"]["min_cosine"]  # the all-INT8 graph's held-out min cosine
    monkeypatch.setattr(validate, "tolerance_for", lambda p: Tolerance(lo + 1e-6, 0.0))
    out = export(tiny_checkpoint, tmp_path / "int8", to="onnx", precision="int8", runtime="tensorrt",
                 calibration_size=64)
    m = read_manifest(out)
    fb = m["quantization"]["fallback"]
    assert fb["all_quantized_first"]["bundle_holds"] == "fallback"
    assert fb["all_quantized_first"]["validation_min_cosine"] == pytest.approx(lo, abs=1e-5)
    assert fb["kept_high_precision"] and fb["kept_high_precision"] == ranking[: len(fb["kept_high_precision"])]
    assert len(m["quantization"]["quantized_matmuls"]) == 14 - len(fb["kept_high_precision"])
    assert m["validation"]["passed"] and m["validation"]["min_cosine"] > lo


def test_fallback_keeps_as_many_as_the_target_needs(tiny_checkpoint, tmp_path, monkeypatch):
    """A target the all-INT8 simulation misses by far (0.99999): the fallback is not capped (it used to give
    up past a quarter of the projections and keep none); it keeps the shortest costliest-first prefix
    that meets the target on the whole probe, records it, and the export passes."""
    _strict_budget(monkeypatch, 0.99999)
    out = export(tiny_checkpoint, tmp_path / "int8", to="onnx", precision="int8", runtime="tensorrt",
                 calibration_size=64)
    q = read_manifest(out)["quantization"]
    fb = q["fallback"]
    kept = fb["kept_high_precision"]
    assert "all_quantized_first" not in fb  # the all-quantised simulation missed the budget itself
    assert fb["simulated_min_cosine_all_quantized"] < fb["target"] <= fb["simulated_min_cosine"]
    assert len(kept) > 14 // 4, kept  # more than the old cap
    assert kept == [r["projection"] for r in fb["sensitivity"][: len(kept)]]
    assert len(q["quantized_matmuls"]) == 14 - len(kept)
    assert read_manifest(out)["validation"]["passed"]


def test_budget_miss_fails_with_the_sensitivity_report(tiny_checkpoint, tmp_path, monkeypatch):
    """Outside the budget with --no-fallback: the error ranks the projections by what keeping each in
    high precision would recover (the report that replaced the single refusal line), and nothing is kept."""
    import re

    import nvembed_sdk.exporters.validate as validate
    from nvembed_sdk import ToleranceExceeded
    from nvembed_sdk.exporters import quantize
    from nvembed_sdk.parity import Tolerance

    monkeypatch.setattr(quantize, "SIMULATED_MARGIN", 0.0099)  # the simulation misses its target: ranking made
    monkeypatch.setattr(validate, "tolerance_for", lambda precision: Tolerance(0.9999999, 1.0))  # validation fails
    with pytest.raises(ToleranceExceeded) as err:
        export(tiny_checkpoint, tmp_path / "int8", to="onnx", precision="int8", runtime="tensorrt",
               calibration_size=64, fallback=False)
    msg = str(err.value)
    assert "sensitivity (costliest projections first" in msg, msg
    ranked = re.findall(r"layers\.\d+\.(?:attn|mlp)\.\w+_proj: min cosine [\d.]+ if kept high precision", msg)
    assert len(ranked) >= 2, msg
    assert not (tmp_path / "int8").exists()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tensorrt_graph_audit_shipped_model(precision, tmp_path):
    """The shipped model (minutes on 2 cores: run with -m slow)."""
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"{SHIPPED} has no weights")
    # The done-when audit on the fully quantised graph (fallback off: every projection INT8/FP8, and
    # the held-out validation, not the conservative simulation, decides the budget).
    out = export(SHIPPED, tmp_path / precision, to="onnx", precision=precision, runtime="tensorrt", fallback=False)
    audit = assert_tensorrt_graph(out, precision)
    assert audit["decoder_gemm_macs"].get(precision) == 1.0
    # The default export (fallback on) too. Version 7's FP8 simulation lands at 0.99797 against its
    # 0.998 target (budget + SIMULATED_MARGIN) but above the 0.99 budget, so the all-FP8 graph is
    # validated first (0.995) and kept: no projection falls back.
    default = export(SHIPPED, tmp_path / f"{precision}-default", to="onnx", precision=precision, runtime="tensorrt")
    assert_tensorrt_graph(default, precision)
    assert read_manifest(default)["quantization"].get("fallback", {}).get("kept_high_precision", []) == []
    m = read_manifest(out)
    print(f"\n{precision}: decoder GEMM MACs {audit['decoder_gemm_macs']}, min cosine {m['validation']['min_cosine']}, "
          f"top-10 {m['validation']['topk_agreement']}, kept "
          f"{m['quantization'].get('fallback', {}).get('kept_high_precision', [])}, "
          f"o_proj headroom {m['quantization'].get('o_proj_range', {}).get('headroom')}")


def _fp8_mha_pattern(bundle: Path) -> int:
    """Layers in TensorRT's FP8 attention layout: Q/DQ -> BMM1 (both inputs) ... Softmax -> (Cast) ->
    Q/DQ -> BMM2 (P and V) -> Q/DQ, every Q/DQ per-tensor with an E4M3 zero point."""
    from nvembed_sdk.exporters.qdq import attention_bmms

    graph = onnx.load(str(bundle / "model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    n = 0
    for bmm1, _sm, bmm2 in attention_bmms(graph):
        for name in [*bmm1.input, *bmm2.input]:
            dq = producer[name]
            assert dq.op_type == "DequantizeLinear" and producer[dq.input[0]].op_type == "QuantizeLinear", name
            assert list(inits[dq.input[1]].dims) == [], name  # per-tensor scale
            assert inits[dq.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN
        after = [c for c in graph.node if bmm2.output[0] in c.input]
        assert [c.op_type for c in after] == ["QuantizeLinear"]
        n += 1
    return n


def test_fp8_attention_forced_on(tiny_checkpoint, tmp_path):
    out = export(tiny_checkpoint, tmp_path / "fp8a", to="onnx", precision="fp8", runtime="tensorrt",
                 calibration_size=64, fp8_attention=True)
    m = read_manifest(out)
    att = m["quantization"]["attention"]
    assert att["bmm_dtype"] == "fp8" and att["reason"].startswith("forced")
    assert att["measured_min_cosine"] >= att["target"] >= 0.99  # the graph itself, in ONNX Runtime, vs fp32
    assert all(r["p"] == 1.0 for r in att["ranges"])  # the softmax output's bound, not a calibrated maximum
    assert _fp8_mha_pattern(out) == m["model"]["num_hidden_layers"]
    audit = assert_tensorrt_graph(out, "fp8")
    assert audit["attention_bmm_macs"] == {"fp8": 1.0}
    ref = Embedder.load(tiny_checkpoint, device="cpu").embed(SAMPLE_TEXTS)
    assert_close_cos(Embedder.load(out, device="cpu").embed(SAMPLE_TEXTS), ref, 0.99)
    res = CliRunner().invoke(main, ["info", str(out)])
    assert res.exit_code == 0, res.output
    lines = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in res.output.splitlines() if ":" in ln}
    assert lines["attention BMMs"].startswith("fp8 (forced") and lines["attention BMM MACs by dtype"] == "fp8 100.0%"


def test_fp8_attention_default_decides_by_budget(trt_bundles):
    """Default (None): on exactly when the graph with FP8 BMMs, run on held-out text, meets the target."""
    m = read_manifest(trt_bundles["fp8"])
    att = m["quantization"]["attention"]
    on = att["measured_min_cosine"] >= att["target"]
    assert att["bmm_dtype"] == ("fp8" if on else "fp16")
    assert m["graph"]["attention_bmm_macs"] == ({"fp8": 1.0} if on else {"fp16": 1.0})
    assert read_manifest(trt_bundles["int8"])["quantization"]["attention"]["bmm_dtype"] == "fp16"


def test_fp8_attention_over_budget(tiny_checkpoint, tmp_path, monkeypatch):
    """A target FP8 attention cannot meet (0.99999): the default leaves the BMMs fp16 and says why;
    --fp8-attention fails with one line naming the fix, and leaves nothing at the target."""
    from nvembed_sdk.errors import InputError
    from nvembed_sdk.exporters import quantize

    monkeypatch.setattr(quantize, "FP8_ATTENTION_MARGIN", 0.00999)
    with pytest.raises(InputError, match=r"--fp8-attention: min cosine .* below 0\.9999.*drop --fp8-attention"):
        export(tiny_checkpoint, tmp_path / "forced", to="onnx", precision="fp8", runtime="tensorrt",
               calibration_size=64, fp8_attention=True)
    assert not (tmp_path / "forced").exists()
    out = export(tiny_checkpoint, tmp_path / "auto", to="onnx", precision="fp8", runtime="tensorrt",
                 calibration_size=64)
    att = read_manifest(out)["quantization"]["attention"]
    assert att["bmm_dtype"] == "fp16" and att["reason"] == "over budget on held-out calibration text"
    assert att["measured_min_cosine"] < att["target"]
    assert read_manifest(out)["graph"]["attention_bmm_macs"] == {"fp16": 1.0}


@pytest.mark.parametrize("precision, runtime", [("int8", "tensorrt"), ("int8", "onnxruntime")])
def test_fp8_attention_refused_elsewhere(tiny_checkpoint, tmp_path, precision, runtime):
    from nvembed_sdk.errors import InputError

    with pytest.raises(InputError, match="--fp8-attention.*--runtime tensorrt"):
        export(tiny_checkpoint, tmp_path / "x", to="onnx", precision=precision, runtime=runtime, fp8_attention=True)
