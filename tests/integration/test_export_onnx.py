"""Checkpoint -> ONNX bundle -> ONNX Runtime (CPU), validated on untraced shapes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import SAMPLE_TEXTS, assert_close_cos

onnx = pytest.importorskip("onnx", reason="needs the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install -e '.[onnx]'")

from nvembed_sdk import ArtifactError, Embedder, InputError, ToleranceExceeded  # noqa: E402
from nvembed_sdk.cli import main  # noqa: E402
from nvembed_sdk.exporters.onnx_export import export_onnx  # noqa: E402
from nvembed_sdk.manifest import read_manifest  # noqa: E402


@pytest.fixture(scope="module")
def bundle_fp32(tiny_checkpoint, tmp_path_factory):
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx32"))


@pytest.fixture(scope="module")
def bundle_fp16(tiny_checkpoint, tmp_path_factory):
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx16"), precision="fp16")


def test_graph_contract(bundle_fp32):
    model = onnx.load(str(bundle_fp32 / "model.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"], "pool_mask": ["batch", "seq"]}
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in model.graph.input)
    out = model.graph.output[0]
    assert out.name == "embeddings" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 64]
    custom = [n for n in model.graph.node if n.domain == "nvembed"]
    assert len(custom) == 1 and custom[0].op_type == "LatentAttentionPool"
    assert [(f.domain, f.name) for f in model.functions] == [("nvembed", "LatentAttentionPool")]
    assert {o.domain: o.version for o in model.opset_import} == {"": 20, "nvembed": 2}
    # K/V of the latents are folded constants (to_kv is not in the graph), and so are W_q.K and V.W_out.
    names = {i.name for i in model.graph.initializer}
    assert {"nvembed_head.w_qk", "nvembed_head.w_vo"} <= names and not any("to_kv" in n for n in names)
    onnx.checker.check_model(model)


def test_manifest_records_export(bundle_fp32, tiny_checkpoint):
    m = read_manifest(bundle_fp32)
    assert m["kind"] == "onnx" and m["precision"] == "fp32" and m["opset"] == 20
    assert m["files"] == {"model": "model.onnx"} and m["model"]["dim"] == 64
    assert m["text"]["max_length"] == 512 and m["text"]["padding_side"] == "right"
    assert len(m["source"]["sha256"]) == 64
    v = m["validation"]
    assert v["passed"] and v["min_cosine"] >= 0.99999
    assert {s["batch"] for s in v["shapes"]} >= {1, 5, 7} and max(s["seq"] for s in v["shapes"]) == 512
    assert (bundle_fp32 / "tokenizer.json").is_file()


@pytest.mark.parametrize("path_kind", ["dir", "file"])
def test_onnxruntime_matches_torch(bundle_fp32, tiny_checkpoint, path_kind):
    ref = Embedder.load(tiny_checkpoint, device="cpu")
    cand = Embedder.load(bundle_fp32 if path_kind == "dir" else bundle_fp32 / "model.onnx", device="cpu")
    assert cand.backend == "onnxruntime" and cand.precision == "fp32" and cand.device == "cpu"
    ins = "Instruct: find the package\nQuery: "
    for bs in (1, 3, 4):
        assert_close_cos(cand.embed(SAMPLE_TEXTS, batch_size=bs), ref.embed(SAMPLE_TEXTS), 0.99999)
        assert_close_cos(cand.embed(SAMPLE_TEXTS, instruction=ins, batch_size=bs),
                         ref.embed(SAMPLE_TEXTS, instruction=ins), 0.99999)
    assert cand.embed([]).shape == (0, 64)
    with pytest.raises(InputError, match="normalize=False"):
        cand.embed(["x"], normalize=False)


def test_fp16_bundle_within_budget_on_long_text(bundle_fp16, tiny_checkpoint):
    m = read_manifest(bundle_fp16)
    assert m["precision"] == "fp16" and m["validation"]["passed"]
    model = onnx.load(str(bundle_fp16 / "model.onnx"))
    # fp32 islands: softmax inputs, the head's LayerNorm/pooling, the output.
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    softmax_in = {n.input[0] for n in model.graph.node if n.op_type == "Softmax"}
    casts_to_f32 = {n.output[0] for n in model.graph.node if n.op_type == "Cast"
                    and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)}
    assert softmax_in, "decoder attention should be explicit MatMul/Softmax"
    long = [" ".join(SAMPLE_TEXTS) * 6]
    ref = Embedder.load(tiny_checkpoint, device="cpu").embed(long)
    got = Embedder.load(bundle_fp16, device="cpu").embed(long)
    assert_close_cos(got, ref, 0.999)
    assert casts_to_f32


def test_parity_cli_pass_and_fail(tiny_checkpoint, bundle_fp32, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["parity", str(tiny_checkpoint), str(bundle_fp32), "--limit", "24",
                               "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and json.loads((tmp_path / "r.json").read_text())["passed"]
    # a different model (re-initialised weights) must fail
    from nvembed_sdk.checkpoint import load_model, save_model

    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    save_model(load_model(other).init_weights(seed=123), other)
    res = runner.invoke(main, ["parity", str(other), str(bundle_fp32), "--limit", "24"])
    assert res.exit_code == 1 and "FAIL" in res.output


def test_assert_parity_helper(tiny_checkpoint, bundle_fp32):
    from nvembed_sdk.parity import assert_parity

    report = assert_parity(tiny_checkpoint, bundle_fp32, texts=SAMPLE_TEXTS * 2)
    assert report and report.would_pass_at.min_cosine >= 0.99999
    with pytest.raises(ToleranceExceeded) as err:
        assert_parity(tiny_checkpoint, bundle_fp32, texts=SAMPLE_TEXTS * 2, min_cosine=1.0)
    assert err.value.report is not None and not err.value.report


def test_export_cli_and_no_validate(tiny_checkpoint, tmp_path):
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--to", "onnx",
                                    "--output", str(tmp_path / "b"), "--no-validate"])
    assert res.exit_code == 0, res.output
    assert "NOT checked" in res.output
    assert read_manifest(tmp_path / "b")["validation"] == {"skipped": True}


def test_export_rejects_bad_requests(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="opset"):
        export_onnx(tiny_checkpoint, tmp_path / "x", opset=13)
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--to", "onnx",
                                    "--precision", "bf16", "--output", str(tmp_path / "y")])
    assert res.exit_code == 1 and "bf16" in res.output


def test_corrupt_onnx_is_an_artifact_error(bundle_fp32, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle_fp32, broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="model.onnx .* 11 bytes, the manifest records"):
        Embedder.load(broken)  # the manifest's checksums catch it before ONNX Runtime
    (broken / "nvembed.json").unlink()  # a bare model.onnx: ONNX Runtime's own refusal, one line
    with pytest.raises(ArtifactError, match="ONNX Runtime could not load"):
        Embedder.load(broken / "model.onnx")


def test_explicit_providers(bundle_fp32):
    from nvembed_sdk import BackendUnavailableError

    e = Embedder.load(bundle_fp32, providers=["CPUExecutionProvider"], intra_op_num_threads=1)
    assert e.device == "cpu"
    with pytest.raises(BackendUnavailableError, match="NoSuchExecutionProvider"):
        Embedder.load(bundle_fp32, providers=["NoSuchExecutionProvider"])


def test_external_data_mechanism(tiny_checkpoint, tmp_path, monkeypatch):
    import nvembed_sdk.exporters.onnx_export as ox

    monkeypatch.setattr(ox, "EXTERNAL_DATA_THRESHOLD", 10_000)  # force the > 2 GB path on a tiny model
    out = export_onnx(tiny_checkpoint, tmp_path / "ext")
    assert (out / "model.onnx.data").is_file() and read_manifest(out)["files"]["data"] == "model.onnx.data"
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    ref = Embedder.load(tiny_checkpoint, device="cpu").embed(SAMPLE_TEXTS)
    assert_close_cos(Embedder.load(out).embed(SAMPLE_TEXTS), ref, 0.99999)


@pytest.mark.slow
def test_model_over_2gb_exports_with_external_data(tmp_path, tiny_tokenizer_dir):
    """A >2 GB fp32 model (random weights) exports with external data and loads back."""
    from nvembed_sdk.checkpoint import save_model
    from nvembed_sdk.config import DecoderConfig, LatentAttentionConfig, NVEmbedConfig
    from nvembed_sdk.model import NVEmbedModel
    from nvembed_sdk.text import TextPipeline

    vocab = TextPipeline(tiny_tokenizer_dir).vocab_size
    cfg = NVEmbedConfig(
        text=DecoderConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=10,
                           num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512),
        latent=LatentAttentionConfig(num_latents_value=32, num_cross_heads=2, cross_dim_head=256,
                                     latent_dim=2048, hidden_dim=2048), max_length=64, torch_dtype="float32")
    assert cfg.num_parameters * 4 > 2 * 1024**3
    ckpt = tmp_path / "big"
    save_model(NVEmbedModel(cfg).init_weights(seed=0), ckpt)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, ckpt / f.name)
    out = export_onnx(ckpt, tmp_path / "big-onnx", texts=SAMPLE_TEXTS * 2)
    assert (out / "model.onnx.data").stat().st_size > 2 * 1024**3
    e = Embedder.load(out)
    assert e.dim == 2048 and e.embed("hello").shape == (2048,)
    assert np.isfinite(e.embed(SAMPLE_TEXTS)).all()
