"""Bundles prove what they are: recorded sizes and sha256, files inside the bundle only, and a
tokenizer whose ids fit the model's embedding, for checkpoints, ONNX and engine bundles."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SAMPLE_TEXTS, tiny_config

pytest.importorskip("onnx", reason="needs the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install -e '.[onnx]'")

from nvembed_sdk import ArtifactError, Embedder  # noqa: E402
from nvembed_sdk.bundle_files import sha256_of  # noqa: E402
from nvembed_sdk.cli import main  # noqa: E402
from nvembed_sdk.exporters.onnx_export import export_onnx  # noqa: E402
from nvembed_sdk.manifest import read_manifest  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("b") / "onnx", validate=False)


@pytest.fixture(scope="module")
def other_bundle(other_checkpoint, tmp_path_factory) -> Path:
    return export_onnx(other_checkpoint, tmp_path_factory.mktemp("o") / "onnx", validate=False)


@pytest.fixture()
def copy(bundle, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def _edit_manifest(directory: Path, **changes) -> None:
    path = directory / "nvembed.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def test_manifest_records_every_file(bundle):
    m = read_manifest(bundle)
    assert m["format_version"] == 2
    names = set(m["checksums"])
    assert names == {"model.onnx", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    for name, rec in m["checksums"].items():
        assert rec == {"bytes": (bundle / name).stat().st_size, "sha256": sha256_of(bundle / name)}


def test_swapped_model_of_same_shape_is_refused(copy, other_bundle, bundle):
    assert (other_bundle / "model.onnx").stat().st_size == (bundle / "model.onnx").stat().st_size  # same shape
    ours = Embedder.load(bundle).embed(SAMPLE_TEXTS)
    theirs = Embedder.load(other_bundle).embed(SAMPLE_TEXTS)
    assert float((ours * theirs).sum(1).min()) < 0.9  # really another model
    shutil.copy(other_bundle / "model.onnx", copy / "model.onnx")
    with pytest.raises(ArtifactError, match=r"model\.onnx \| got sha256 .* Note: the file as exported"):
        Embedder.load(copy)
    with pytest.raises(ArtifactError, match="model.onnx"):
        Embedder.load(copy / "model.onnx")  # the file itself, manifest beside it
    res = CliRunner().invoke(main, ["info", str(copy)])
    assert res.exit_code == 1 and "model.onnx" in res.output and "sha256" in res.output


def test_swapped_model_keeping_mtime_is_still_refused(copy, other_bundle):
    Embedder.load(copy)  # hashes cached for this process
    st = (copy / "model.onnx").stat()
    shutil.copyfile(other_bundle / "model.onnx", copy / "model.onnx")  # same inode, same size
    os.utime(copy / "model.onnx", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ArtifactError, match="sha256"):
        Embedder.load(copy)


def test_truncated_and_missing_files_are_refused(copy):
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=rf"model\.onnx \| got {len(data) // 2:,} bytes, the manifest records"):
        Embedder.load(copy)
    (copy / "model.onnx").write_bytes(data)
    Embedder.load(copy)
    tok = (copy / "tokenizer.json").read_text()
    (copy / "tokenizer.json").write_text(tok[:-10])
    with pytest.raises(ArtifactError, match=r"tokenizer\.json \| got"):
        Embedder.load(copy)
    (copy / "tokenizer.json").write_text(tok)
    (copy / "special_tokens_map.json").unlink()
    with pytest.raises(ArtifactError, match=r"special_tokens_map\.json \| got missing"):
        Embedder.load(copy)


def test_large_files_hashed_on_request(copy, other_bundle, monkeypatch):
    import nvembed_sdk.bundle_files as bf

    shutil.copy(other_bundle / "model.onnx", copy / "model.onnx")  # same size, other bytes
    monkeypatch.setattr(bf, "ALWAYS_HASH_BELOW", 100_000)  # model.onnx (838 KB) counts as "large" now
    Embedder.load(copy)  # sizes only for large files: documented
    with pytest.raises(ArtifactError, match="sha256"):
        Embedder.load(copy, verify=True)
    res = CliRunner().invoke(main, ["info", str(copy)])
    assert res.exit_code == 0 and "--verify hashes those" in res.output, res.output
    res = CliRunner().invoke(main, ["info", str(copy), "--verify"])
    assert res.exit_code == 1 and "model.onnx" in res.output and "sha256" in res.output


def test_external_data_is_recorded_and_checked(tiny_checkpoint, tmp_path, monkeypatch):
    import nvembed_sdk.exporters.onnx_export as ox

    monkeypatch.setattr(ox, "EXTERNAL_DATA_THRESHOLD", 10_000)  # the > 2 GB layout on the tiny model
    out = export_onnx(tiny_checkpoint, tmp_path / "ext", validate=False)
    data = out / "model.onnx.data"
    assert read_manifest(out)["checksums"]["model.onnx.data"] == {"bytes": data.stat().st_size,
                                                                  "sha256": sha256_of(data)}
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one weight byte flipped: same size, other model
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data \| got sha256"):
        Embedder.load(out)
    data.write_bytes(bytes(raw[:-4]))
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data \| got [\d,]+ bytes"):
        Embedder.load(out)


def test_info_verify_passes_on_a_good_bundle(bundle):
    res = CliRunner().invoke(main, ["info", str(bundle), "--verify"])
    assert res.exit_code == 0 and "OK: 4 files, sizes and sha256 match" in res.output, res.output


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/hostname", "sub/model.onnx", ".."])
def test_model_file_outside_the_bundle_is_refused(copy, name):
    shutil.copy(copy / "model.onnx", copy.parent / "model.onnx")  # a real model one level up
    _edit_manifest(copy, files={"model": name})
    with pytest.raises(ArtifactError, match=r"files\.model \| got .* a plain file name inside the bundle"):
        Embedder.load(copy)


def test_symlink_escaping_the_bundle_is_refused(copy, other_bundle):
    (copy / "model.onnx").unlink()
    (copy / "model.onnx").symlink_to(other_bundle / "model.onnx")
    with pytest.raises(ArtifactError, match="outside the bundle"):
        Embedder.load(copy)


def test_unrecorded_or_missing_checksums(copy, caplog):
    m = read_manifest(copy)
    _edit_manifest(copy, checksums={k: v for k, v in m["checksums"].items() if k != "tokenizer_config.json"})
    with pytest.raises(ArtifactError, match=r"tokenizer_config\.json \| got not recorded"):
        Embedder.load(copy)
    _edit_manifest(copy, checksums=None)
    with pytest.raises(ArtifactError, match="no checksums"):
        Embedder.load(copy)
    # A bundle written before checksums existed (format_version 1) loads with one warning.
    manifest = {k: v for k, v in m.items() if k != "checksums"}
    (copy / "nvembed.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with caplog.at_level(logging.WARNING, logger="nvembed_sdk"):
        assert Embedder.load(copy).embed("x").shape == (64,)
        Embedder.load(copy)
    warnings = [r for r in caplog.records if "predates file checksums" in r.getMessage()]
    assert len(warnings) == 1 and "re-export" in warnings[0].getMessage()


def _checkpoint_with_small_embedding(tiny_checkpoint: Path, out: Path) -> Path:
    """The tiny tokenizer (600 ids) with a model whose embedding has 500 rows."""
    from nvembed_sdk.checkpoint import save_model
    from nvembed_sdk.model import NVEmbedModel

    save_model(NVEmbedModel(tiny_config(500)).init_weights(seed=1).eval(), out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_checkpoint / name, out / name)
    return out


def test_tokenizer_with_more_ids_than_the_embedding(tiny_checkpoint, tmp_path):
    ckpt = _checkpoint_with_small_embedding(tiny_checkpoint, tmp_path / "ckpt")
    msg = r"tokenizer\.json \| got token ids up to 599, but the model's embedding has 500 rows"
    with pytest.raises(ArtifactError, match=msg):
        Embedder.load(ckpt, device="cpu")  # checkpoint (torch backend)
    with pytest.raises(ArtifactError, match=msg):
        export_onnx(ckpt, tmp_path / "onnx")  # refused before any slow work
    assert not (tmp_path / "onnx").exists()


def test_tokenizer_range_checked_for_onnx_and_engine_bundles(copy, tmp_path):
    from nvembed_sdk.manifest import write_manifest

    m = read_manifest(copy)
    write_manifest(copy, {**m, "model": {**m["model"], "vocab_size": 500}})  # a consistent, wrong manifest
    with pytest.raises(ArtifactError, match="embedding has 500 rows"):
        Embedder.load(copy)
    # An engine bundle is checked before TensorRT is touched (so this runs without a GPU).
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "engine.plan").write_bytes(b"plan bytes")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(copy / name, engine / name)
    write_manifest(engine, {"kind": "tensorrt", "precision": "fp16", "files": {"model": "engine.plan"},
                            "model": {"dim": 64, "vocab_size": 500}, "text": {"max_length": 64}})
    with pytest.raises(ArtifactError, match="embedding has 500 rows"):
        Embedder.load(engine)
    (engine / "engine.plan").write_bytes(b"PLAN BYTES")  # same size, other bytes
    with pytest.raises(ArtifactError, match=r"engine\.plan \| got sha256"):
        Embedder.load(engine)
