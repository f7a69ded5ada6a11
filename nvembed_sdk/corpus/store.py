"""The output of a corpus job: one Parquet file per part, written to staging and renamed.

Layout of ``OUT/``::

    _job.json              the settings the vectors depend on (a rerun must match them to resume)
    part-000000.parquet    id (string), vector (float32[D] or int8[D]), scale (float32, int8 only),
    part-000001.parquet    tokens (int32: tokens embedded, instruction included); the schema
    ...                    metadata "nvembed" holds the artifact's sha256, precision, dim, dtype
    _index.json            written last, after checking every id once: the parts, rows, totals
    .staging/              files being written; emptied when a job starts

A part file appears by ``rename`` only when complete, so a killed job leaves whole parts or
nothing; a rerun skips the parts that exist and never writes an id twice. Two jobs must not
write the same OUT at the same time.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk._optional import require
from nvembed_sdk.corpus.source import Part
from nvembed_sdk.errors import ArtifactError, InputError, fmt, writing

JOB_FILE = "_job.json"
INDEX_FILE = "_index.json"
STAGING = ".staging"
META_KEY = b"nvembed"
DTYPES = ("float32", "int8")
# Settings that do not change the vectors: a rerun may use other values.
FREE_KEYS = ("runner",)


def part_path(out: str | Path, index: int) -> Path:
    return Path(out) / f"part-{index:06d}.parquet"


def quantize_int8(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: ``v ~= q * scale`` with ``scale = max|v| / 127``.

    Args:
        vectors: (N, D) float32.

    Returns:
        (N, D) int8 and (N,) float32 scales.
    """
    scale = np.abs(vectors).max(axis=1) / 127.0  # (N,)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(vectors / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def open_job(out: str | Path, spec: dict[str, Any]) -> Path:
    """Create ``OUT`` (or reopen it for a resumed job) and empty its staging folder.

    Raises:
        InputError: ``OUT`` holds a job with other settings, or files that are not a job's.
    """
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise InputError(fmt("--output", f"{root} is a file", "a directory (new, or a job's to resume)"))
    job = root / JOB_FILE
    if job.is_file():
        old = json.loads(job.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(spec) if k not in FREE_KEYS and old.get(k) != spec.get(k))
        if diff:
            raise InputError(fmt(f"--output {root}", f"a job with other settings ({', '.join(diff)})",
                                 "the same input, artifact, precision, --dtype, --task/--instruction, "
                                 "--max-length and --block-size to resume it, or a new --output"))
    elif root.is_dir() and any(p.name != STAGING for p in root.iterdir()):
        raise InputError(fmt(f"--output {root}", "a non-empty directory without _job.json",
                             "a new directory, or one an embed-corpus job wrote"))
    root.mkdir(parents=True, exist_ok=True)
    staging = root / STAGING
    if staging.exists():
        shutil.rmtree(staging)  # leftovers of a killed job: never renamed, so never counted
    staging.mkdir()
    if not job.is_file():
        _write_json(job, spec)
    return root


def part_done(out: str | Path, part: Part) -> bool:
    """Whether ``part`` has a complete file (renamed into place, with the planned rows)."""
    path = part_path(out, part.index)
    if not path.is_file():
        return False
    meta = read_meta(path)
    return meta.get("start") == part.start and meta.get("stop") == part.stop


def write_part(out: str | Path, part: Part, ids: list[str], vectors: np.ndarray, tokens: np.ndarray,
               dtype: str, meta: dict[str, Any]) -> Path:
    """Write one part's rows to staging, then rename it into place.

    Args:
        out: the job's directory (``open_job`` made it).
        part: the rows.
        ids: (N,) ids in input order.
        vectors: (N, D) float32, L2-normalised.
        tokens: (N,) tokens embedded per row.
        dtype: ``float32`` or ``int8`` (with a per-row scale).
        meta: the job's facts (artifact sha256, precision, dim...), stored in the file's metadata.
    """
    require("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, dim = vectors.shape
    assert n == len(ids) == len(tokens) == part.rows, (n, len(ids), len(tokens), part.rows)
    cols: dict[str, Any] = {"id": pa.array(ids, type=pa.string())}
    if dtype == "int8":
        q, scale = quantize_int8(vectors)
        cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1), type=pa.int8()), dim)
        cols["scale"] = pa.array(scale, type=pa.float32())
    else:
        flat = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)
        cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), dim)
    cols["tokens"] = pa.array(np.asarray(tokens, dtype=np.int32), type=pa.int32())
    info = {**meta, "dtype": dtype, "dim": int(dim), "part": part.index, "start": part.start, "stop": part.stop,
            "rows": n}
    table = pa.table(cols).replace_schema_metadata({META_KEY: json.dumps(info).encode()})
    final = part_path(out, part.index)
    tmp = Path(out) / STAGING / f"{final.stem}.{uuid.uuid4().hex[:8]}.parquet"
    with writing(final, "corpus part"):
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, final)  # atomic: the part exists whole or not at all
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk: no half-written part left in staging
            raise
    return final


def read_meta(path: str | Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError on a damaged file
        raise ArtifactError(fmt(str(path), f"unreadable Parquet ({exc})", "a part written by embed-corpus")) from exc
    return json.loads(raw) if raw else {}


def finalize(out: str | Path, parts: list[Part]) -> dict[str, Any]:
    """Check that every planned part is there and every id appears once, then write ``_index.json``.

    Raises:
        ArtifactError: a part is missing.
        InputError: an id appears twice (the input repeats it).
    """
    import pyarrow.parquet as pq

    root = Path(out)
    missing = [p.index for p in parts if not part_done(root, p)]
    if missing:
        raise ArtifactError(fmt(f"corpus output {root}", f"parts {missing[:5]} missing",
                                "rerun the same command to finish them"))
    ids = np.concatenate([pq.read_table(part_path(root, p.index), columns=["id"]).column("id").to_numpy()
                          for p in parts]) if parts else np.array([], dtype=object)
    uniq, counts = np.unique(ids.astype(str), return_counts=True)
    if (counts > 1).any():
        dups = uniq[counts > 1][:5].tolist()
        raise InputError(fmt(f"corpus ids in {root}", f"duplicates {dups}", "ids unique in the input"))
    metas = [read_meta(part_path(root, p.index)) for p in parts]
    facts = {k: sorted({str(m.get(k)) for m in metas}) for k in ("artifact_sha256", "precision", "dim", "dtype")}
    mixed = {k: v for k, v in facts.items() if len(v) > 1}
    if mixed:
        raise ArtifactError(fmt(f"corpus output {root}", f"parts disagree on {mixed}",
                                "one artifact and precision for every worker (pass --precision: CPU and GPU "
                                "workers default differently); delete the odd parts and rerun"))
    index = {"complete": True, "rows": int(len(ids)), "precision": metas[0].get("precision") if metas else None,
             "backend": metas[0].get("backend") if metas else None, "dim": metas[0].get("dim") if metas else None,
             "dtype": metas[0].get("dtype") if metas else None, "artifact_sha256": metas[0].get("artifact_sha256") if metas else None,
             "parts": [{"file": part_path(root, p.index).name, "start": p.start, "stop": p.stop} for p in parts],
             "job": json.loads((root / JOB_FILE).read_text(encoding="utf-8"))}
    _write_json(root / INDEX_FILE, index)
    shutil.rmtree(root / STAGING, ignore_errors=True)
    return index


def read_vectors(out: str | Path, allow_partial: bool = False) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read a job's output back: ids, float32 vectors (int8 ones dequantised), tokens.

    Args:
        out: the job's directory.
        allow_partial: read whatever parts exist (no ``_index.json`` needed). Defaults to False.

    Raises:
        ArtifactError: no ``_index.json`` (the job has not finished) and not ``allow_partial``.
    """
    import pyarrow.parquet as pq

    root = Path(out)
    if allow_partial:
        files = sorted(root.glob("part-*.parquet"))
    else:
        if not (root / INDEX_FILE).is_file():
            raise ArtifactError(fmt(f"corpus output {root}", f"no {INDEX_FILE}",
                                    "a finished job (rerun the command to finish it)"))
        index = json.loads((root / INDEX_FILE).read_text(encoding="utf-8"))
        files = [root / p["file"] for p in index["parts"]]
    ids: list[str] = []
    vecs: list[np.ndarray] = []
    toks: list[np.ndarray] = []
    for f in files:
        t = pq.read_table(f)
        dim = t.schema.field("vector").type.list_size
        v = t.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, dim)
        if "scale" in t.column_names:
            v = v.astype(np.float32) * t.column("scale").to_numpy()[:, None]
        ids += t.column("id").to_pylist()
        vecs.append(v.astype(np.float32))
        toks.append(t.column("tokens").to_numpy())
    if not vecs:
        return [], np.zeros((0, 0), np.float32), np.zeros(0, np.int32)
    return ids, np.concatenate(vecs), np.concatenate(toks)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, "corpus file"):
        try:
            tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


__all__ = ["DTYPES", "INDEX_FILE", "JOB_FILE", "finalize", "open_job", "part_done", "part_path", "quantize_int8",
           "read_meta", "read_vectors", "write_part"]
