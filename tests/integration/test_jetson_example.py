"""examples/jetson_retrieval.py end to end on a tiny random-weight model (CPU).

With random weights only identical text is reliably nearest, so each query is the exact text of
one passage embedded without the query instruction (``--no-instruction``): the right passage
must come first with a cosine of ~1, for fp16 and int8 storage, on the checkpoint (torch) and,
where the ONNX exporter and ONNX Runtime exist, on the ONNX bundle.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "jetson_retrieval.py"

DOCS = {
    "boards/flashing.txt": [
        "Put the board in recovery mode by holding the recovery button while pressing reset.",
        "The flash script writes the bootloader and the root file system over USB.",
    ],
    "boards/power.txt": [
        "The fan speed follows the temperature of the module and can be set with a power profile.",
        "Use the fifteen watt mode when the board runs from a battery.",
    ],
    "notes/audio.md": [
        "Utilities to convert between audio file formats, including Ogg Vorbis and FLAC.",
        "The quick brown fox jumps over the lazy dog.",
        "A lightweight library for parsing command-line options in C programs.",
    ],
}


def _load_example():
    spec = importlib.util.spec_from_file_location("jetson_retrieval", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def example():
    return _load_example()


@pytest.fixture()
def docs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    for rel, paras in DOCS.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


@pytest.fixture(scope="module")
def onnx_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    onnx_export = pytest.importorskip("nvembed_sdk.exporters.onnx_export", reason="the ONNX exporter is absent")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    return Path(onnx_export.export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx"), validate=False))


def _run(example, capsys, argv: list[str]) -> dict:
    assert example.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("artifact", ["checkpoint", "onnx"])
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_index_and_search_find_the_right_passage(example, capsys, docs_dir, tmp_path, tiny_checkpoint,
                                                 request, artifact, dtype):
    model = tiny_checkpoint if artifact == "checkpoint" else request.getfixturevalue("onnx_bundle")
    index = tmp_path / "idx" / "docs.npz"
    res = _run(example, capsys, ["index", "--model", str(model), "--docs", str(docs_dir), "--index", str(index),
                                 "--dtype", dtype, "--device", "cpu"])
    s = res["stats"]
    assert index.is_file() and s["files"] == 3 and s["passages"] == 7
    assert s["vector_bytes"] < s["fp32_bytes"] and s["index_s"] > 0 and s["peak_rss_mb"] > 0

    truth = {"Use the fifteen watt mode when the board runs from a battery.": ("boards/power.txt", 1),
             "Put the board in recovery mode by holding the recovery button while pressing reset.":
                 ("boards/flashing.txt", 0),
             "The quick brown fox jumps over the lazy dog.": ("notes/audio.md", 1)}
    argv = ["search", "--model", str(model), "--index", str(index), "-k", "3", "--no-instruction", "--device", "cpu"]
    for q in truth:
        argv += ["--query", q]
    res = _run(example, capsys, argv)
    for r in res["results"]:
        top = r["hits"][0]
        assert (top["path"], top["passage"]) == truth[r["query"]], r
        assert top["text"] == r["query"] and top["score"] > (0.999 if dtype == "fp16" else 0.99)
        assert len(r["hits"]) == 3 and r["hits"][0]["score"] >= r["hits"][1]["score"] >= r["hits"][2]["score"]
    st = res["stats"]
    assert st["queries"] == 3 and st["index_dtype"] == dtype
    assert 0 < st["query"]["p50_ms"] <= st["query"]["p95_ms"] and st["search_only"]["p50_ms"] > 0


def test_text_output_and_help(example, capsys, docs_dir, tmp_path, tiny_checkpoint):
    index = tmp_path / "t.npz"
    assert example.main(["index", "--model", str(tiny_checkpoint), "--docs", str(docs_dir), "--index", str(index),
                         "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "indexed 7 passages from 3 files" in out and "passages/s" in out and "peak RSS" in out
    q = DOCS["notes/audio.md"][2]
    assert example.main(["search", "--model", str(tiny_checkpoint), "--index", str(index), "--query", q,
                         "--no-instruction", "-k", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "notes/audio.md#2" in out.splitlines()[1] and "p50" in out and "p95" in out
    proc = subprocess.run([sys.executable, "-P", str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "jetson_retrieval.py index" in proc.stdout


def test_quantize_and_search_are_exact_on_known_vectors(example):
    import numpy as np

    rng = np.random.default_rng(0)
    v = rng.standard_normal((50, 32)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for dtype, tol in (("fp16", 1e-3), ("int8", 2e-2)):
        stored, scales, norms = example.quantize(v, dtype)
        assert stored.dtype == (np.float16 if dtype == "fp16" else np.int8)
        idx, scores = example.search(stored, scales, norms, v[[3, 17]], k=4)
        assert idx[:, 0].tolist() == [3, 17] and np.all(np.abs(scores[:, 0] - 1) < tol)
        exact = v[[3, 17]] @ v.T
        assert np.allclose(scores, np.take_along_axis(exact, idx, axis=1), atol=tol)
