"""Corpus jobs without Ray: inputs and parts, the Parquet store, resume, int8, errors, the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="the corpus job writes Parquet: pip install -e '.[ray]'")
import pyarrow.parquet as pq  # noqa: E402

from nvembed_sdk.corpus.job import CorpusJob, run_local, tokenize_part  # noqa: E402
from nvembed_sdk.corpus.source import CorpusSource  # noqa: E402
from nvembed_sdk.corpus.store import INDEX_FILE, part_path, quantize_int8, read_meta, read_vectors  # noqa: E402
from nvembed_sdk.embedder import Embedder, query_instruction  # noqa: E402
from nvembed_sdk.errors import InputError  # noqa: E402

from conftest import SAMPLE_TEXTS  # noqa: E402

ROWS = [{"id": f"p{i:03d}", "text": f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} (passage {i})"} for i in range(23)]


def _write_jsonl(path: Path, rows: list[dict], blank_every: int = 0) -> Path:
    lines = []
    for i, r in enumerate(rows):
        lines.append(json.dumps(r, ensure_ascii=False))
        if blank_every and i % blank_every == 0:
            lines.append("")  # blank lines are skipped, not rows
    data = ("\n".join(lines) + "\n").encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet", "files"])
def test_every_input_kind_reads_its_rows_in_order(tmp_path, kind):
    if kind == "parquet":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"id": [r["id"] for r in ROWS], "text": [r["text"] for r in ROWS]}), path,
                       row_group_size=5)  # parts straddle row groups
    elif kind == "files":
        path = tmp_path / "docs"
        for r in ROWS:
            (path / r["id"][:2]).mkdir(parents=True, exist_ok=True)
            (path / r["id"][:2] / f"{r['id']}.txt").write_text(r["text"], encoding="utf-8")
    else:
        path = _write_jsonl(tmp_path / f"c.{kind}", ROWS, blank_every=4)
    src = CorpusSource(str(path))
    parts = src.plan(block_size=7)
    assert [p.rows for p in parts] == [7, 7, 7, 2]
    ids, texts = [], []
    for p in parts:
        a, b = src.read(p)
        ids += a
        texts += b
    want_ids = [f"{r['id'][:2]}/{r['id']}.txt" for r in ROWS] if kind == "files" else [r["id"] for r in ROWS]
    assert ids == want_ids and texts == [r["text"] for r in ROWS]


def test_local_job_equals_embed_and_resumes_only_missing_parts(tmp_path, tiny_checkpoint):
    src = _write_jsonl(tmp_path / "c.jsonl", ROWS)
    job = CorpusJob(str(src), str(tiny_checkpoint), str(tmp_path / "out"), block_size=6, batch_size=4)
    first = run_local(job, show_progress=False, log=lambda s: None)
    assert first["rows"] == first["embedded"] == len(ROWS) and first["precision"] == "fp32"
    ids, vecs, tokens = read_vectors(tmp_path / "out")
    ref = Embedder.load(tiny_checkpoint).embed([r["text"] for r in ROWS], batch_size=5)
    assert ids == [r["id"] for r in ROWS]
    assert _cos(vecs, ref).min() >= 0.99999
    text = Embedder.load(tiny_checkpoint).text
    assert tokens.tolist() == [len(t) for t in text.tokenize([r["text"] for r in ROWS])]
    meta = read_meta(part_path(tmp_path / "out", 0))
    assert meta["precision"] == "fp32" and len(meta["artifact_sha256"]) == 64 and meta["dim"] == vecs.shape[1]
    schema = pq.read_schema(part_path(tmp_path / "out", 0))
    assert schema.names == ["id", "vector", "tokens"] and schema.field("vector").type.value_type == pa.float32()

    # A lost part (as a kill before its rename leaves it) is the only one embedded again.
    kept = part_path(tmp_path / "out", 0).stat().st_ino
    part_path(tmp_path / "out", 2).unlink()
    (tmp_path / "out" / INDEX_FILE).unlink()
    again = run_local(job, show_progress=False, log=lambda s: None)
    assert again["embedded"] == 6 and again["rows"] == len(ROWS)
    assert part_path(tmp_path / "out", 0).stat().st_ino == kept  # finished parts are never rewritten
    ids2, vecs2, _ = read_vectors(tmp_path / "out")
    assert ids2 == ids and np.allclose(vecs2, vecs, atol=1e-6)


def test_query_corpus_and_int8(tmp_path, tiny_checkpoint):
    src = _write_jsonl(tmp_path / "q.jsonl", [{"qid": r["id"], "q": r["text"]} for r in ROWS[:9]])
    task = "Given a question, retrieve passages that answer the question"
    job = CorpusJob(str(src), str(tiny_checkpoint), str(tmp_path / "out"), id_column="qid", text_column="q",
                    instruction=query_instruction(task), dtype="int8", block_size=4)
    run_local(job, show_progress=False, log=lambda s: None)
    table = pq.read_table(part_path(tmp_path / "out", 0))
    assert table.schema.field("vector").type.value_type == pa.int8() and "scale" in table.column_names
    _, vecs, _ = read_vectors(tmp_path / "out")
    ref = Embedder.load(tiny_checkpoint).embed_queries([r["text"] for r in ROWS[:9]], task=task)
    assert _cos(vecs, ref).min() >= 0.999  # int8 per-row rounding, not the instruction, is the only difference
    q, scale = quantize_int8(ref)
    assert np.abs(q * scale[:, None] - ref).max() <= scale.max() / 2 + 1e-7


def test_settings_mismatch_foreign_dir_duplicates_and_columns_are_refused(tmp_path, tiny_checkpoint):
    src = _write_jsonl(tmp_path / "c.jsonl", ROWS[:5])
    out = tmp_path / "out"
    run_local(CorpusJob(str(src), str(tiny_checkpoint), str(out), block_size=2), show_progress=False,
              log=lambda s: None)
    with pytest.raises(InputError, match="other settings.*block_size"):
        run_local(CorpusJob(str(src), str(tiny_checkpoint), str(out), block_size=3), show_progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="without _job.json"):
        run_local(CorpusJob(str(src), str(tiny_checkpoint), str(tmp_path / "foreign")), show_progress=False)
    dup = _write_jsonl(tmp_path / "dup.jsonl", [ROWS[0], ROWS[1], ROWS[0]])
    with pytest.raises(InputError, match="duplicates"):
        run_local(CorpusJob(str(dup), str(tiny_checkpoint), str(tmp_path / "d")), show_progress=False)
    assert not (tmp_path / "d" / INDEX_FILE).exists()
    beir = _write_jsonl(tmp_path / "beir.jsonl", [{"_id": "d1", "text": "x"}])
    with pytest.raises(InputError, match="--id-column"):
        tokenize_part(CorpusJob(str(beir), str(tiny_checkpoint), str(tmp_path / "b")),
                      CorpusSource(str(beir)).plan(4)[0])


def test_worker_resources_leave_room_for_the_tokenise_stage():
    from nvembed_sdk.corpus.ray_job import worker_resources

    assert worker_resources({"CPU": 2}, 2, 0, None, 0.25) == pytest.approx(0.875)
    assert worker_resources({"CPU": 16, "GPU": 8}, 8, 1, None, 0.25) == 1.0
    with pytest.raises(InputError, match="tokenise stage needs CPU"):
        worker_resources({"CPU": 2}, 2, 0, 1.0, 0.25)
    with pytest.raises(InputError, match="GPUs"):
        worker_resources({"CPU": 8, "GPU": 1}, 2, 1, None, 0.25)


def test_model_batch_is_the_engine_profiles_opt_batch():
    from types import SimpleNamespace

    from nvembed_sdk.corpus.job import default_batch_size

    engine = SimpleNamespace(manifest={"tensorrt": {"profiles": [{"min": [1, 16], "opt": [8, 128], "max": [32, 512]},
                                                                 {"min": [1, 16], "opt": [4, 512], "max": [8, 1024]}]}})
    assert default_batch_size(engine, None) == 8  # the first profile's opt batch
    assert default_batch_size(engine, 5) == 5  # --batch-size wins
    assert default_batch_size(SimpleNamespace(manifest={}), None) == 32  # checkpoints, ONNX bundles


def test_cli_embed_corpus_local(tmp_path, tiny_checkpoint):
    from click.testing import CliRunner

    from nvembed_sdk.cli import main

    src = _write_jsonl(tmp_path / "c.jsonl", ROWS[:8])
    args = ["embed-corpus", str(src), "--artifact", str(tiny_checkpoint), "-o", str(tmp_path / "o"),
            "--block-size", "3", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["rows"] == 8 and summary["embedded"] == 8
    res = CliRunner().invoke(main, args)  # rerun: nothing left to do
    assert json.loads(res.output.strip().splitlines()[-1])["embedded"] == 0
    bad = CliRunner().invoke(main, [*args[:6], "--task", "t", "--instruction", "x"])
    assert bad.exit_code == 1 and "one of them" in bad.output
