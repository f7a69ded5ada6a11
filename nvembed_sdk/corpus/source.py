"""Corpus inputs: JSONL (plain or gzipped), Parquet, or a folder of text files, cut into parts.

A *part* is a contiguous range of input rows in the input's own order, the unit of work and of
resumption: planning is deterministic, so a rerun over the same input and block size cuts the
same parts, and a part whose output file exists is skipped whole. Planning reads only what it
must (JSONL: the lines' byte offsets, no JSON parsing; Parquet: the footer; a folder: the
sorted file names); the texts are read by whoever embeds the part (a Ray task, or the local loop).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvembed_sdk.errors import InputError, fmt

KINDS = ("jsonl", "parquet", "files")


@dataclass(frozen=True)
class Part:
    """Rows ``[start, stop)`` of the input.

    Attributes:
        index: the part's number (its output file is ``part-{index:06d}.parquet``).
        start: first input row.
        stop: one past the last input row.
        offset: byte offset of row ``start`` (plain JSONL only; -1 otherwise).
        files: the part's file names, relative to the folder (``files`` inputs only).
    """

    index: int
    start: int
    stop: int
    offset: int = -1
    files: tuple[str, ...] = field(default=())

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "start": self.start, "stop": self.stop, "offset": self.offset,
                "files": list(self.files)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Part:
        return cls(int(d["index"]), int(d["start"]), int(d["stop"]), int(d["offset"]), tuple(d["files"]))


@dataclass(frozen=True)
class CorpusSource:
    """Where the passages come from.

    Args:
        path: a ``.jsonl`` / ``.jsonl.gz`` file, a ``.parquet`` file, or a directory of text
            files (each file one passage, its path relative to the directory as the id).
        id_column: the id field (JSONL key / Parquet column). Defaults to ``id``.
        text_column: the text field. Defaults to ``text``.
    """

    path: str
    id_column: str = "id"
    text_column: str = "text"

    @property
    def kind(self) -> str:
        p = Path(self.path)
        if p.is_dir():
            return "files"
        name = p.name.lower()
        if name.endswith(".parquet"):
            return "parquet"
        if name.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
            return "jsonl"
        raise InputError(fmt("corpus input", p.name, "a .jsonl(.gz) or .parquet file, or a folder of text files"))

    def check(self) -> None:
        if not Path(self.path).exists():
            raise InputError(fmt("corpus input", f"{self.path} does not exist",
                                 "a .jsonl(.gz) or .parquet file, or a folder of text files"))
        _ = self.kind

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input for a resumed job: path, sizes, modification times."""
        p = Path(self.path)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        stats = [f.stat() for f in files]
        return {"path": str(p.resolve()), "kind": self.kind, "id_column": self.id_column,
                "text_column": self.text_column, "files": len(files), "bytes": sum(s.st_size for s in stats),
                "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}

    # ---- planning ---------------------------------------------------------------------------

    def plan(self, block_size: int) -> list[Part]:
        """Cut the input into parts of ``block_size`` rows (the last one shorter)."""
        if block_size < 1:
            raise InputError(fmt("block_size", block_size, "an int >= 1"))
        self.check()
        kind = self.kind
        if kind == "files":
            names = _list_files(Path(self.path))
            return [Part(i, lo, min(lo + block_size, len(names)), -1, tuple(names[lo : lo + block_size]))
                    for i, lo in enumerate(range(0, len(names), block_size))]
        if kind == "parquet":
            import pyarrow.parquet as pq

            n = pq.ParquetFile(self.path).metadata.num_rows
            return [Part(i, lo, min(lo + block_size, n)) for i, lo in enumerate(range(0, n, block_size))]
        parts, start, row, plain = [], 0, 0, not self.path.endswith(".gz")
        offset = 0
        part_offset = 0
        with _open(self.path) as fh:
            for line in fh:
                if line.strip():
                    if row - start == block_size:
                        parts.append(Part(len(parts), start, row, part_offset if plain else -1))
                        start, part_offset = row, offset
                    row += 1
                offset += len(line)
        if row > start:
            parts.append(Part(len(parts), start, row, part_offset if plain else -1))
        return parts

    # ---- reading ----------------------------------------------------------------------------

    def read(self, part: Part) -> tuple[list[str], list[str]]:
        """The ids and texts of one part, in input order.

        Raises:
            InputError: a row without the id or text field, or a text that is not a string.
        """
        kind = self.kind
        if kind == "files":
            root = Path(self.path)
            texts = [(root / name).read_text(encoding="utf-8", errors="replace") for name in part.files]
            return list(part.files), texts
        if kind == "parquet":
            return self._read_parquet(part)
        ids, texts = [], []
        for row, rec in zip(range(part.start, part.stop), self._jsonl_records(part), strict=False):
            i, t = self._fields(rec, row)
            ids.append(i)
            texts.append(t)
        if len(ids) != part.rows:
            raise InputError(fmt(f"corpus input {self.path}", f"{part.start + len(ids)} rows",
                                 f"{part.stop} rows as planned: the file changed while the job ran"))
        return ids, texts

    def _jsonl_records(self, part: Part) -> Iterator[Any]:
        with _open(self.path) as fh:
            if part.offset >= 0:
                fh.seek(part.offset)
                row = part.start
            else:
                row = 0
            for line in fh:
                if not line.strip():
                    continue
                if row >= part.start:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InputError(fmt(f"{self.path} row {row}", f"invalid JSON ({exc})",
                                             "one JSON object per line")) from exc
                row += 1
                if row >= part.stop:
                    return

    def _fields(self, rec: Any, row: int) -> tuple[str, str]:
        if not isinstance(rec, dict) or self.id_column not in rec or self.text_column not in rec:
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise InputError(fmt(f"{self.path} row {row}", f"keys {keys}",
                                 f"an object with {self.id_column!r} and {self.text_column!r} "
                                 "(name others with --id-column / --text-column)"))
        text = rec[self.text_column]
        if not isinstance(text, str):
            raise InputError(fmt(f"{self.path} row {row} {self.text_column!r}", type(text).__name__, "a string"))
        return str(rec[self.id_column]), text

    def _read_parquet(self, part: Part) -> tuple[list[str], list[str]]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        names = pf.schema_arrow.names
        missing = [c for c in (self.id_column, self.text_column) if c not in names]
        if missing:
            raise InputError(fmt(f"{self.path} columns", names, f"columns {missing} (or --id-column / --text-column)"))
        ids: list[str] = []
        texts: list[str] = []
        lo = 0
        for g in range(pf.num_row_groups):  # only the row groups overlapping [start, stop)
            n = pf.metadata.row_group(g).num_rows
            hi = lo + n
            if hi > part.start and lo < part.stop:
                table = pf.read_row_group(g, columns=[self.id_column, self.text_column])
                a, b = max(part.start, lo) - lo, min(part.stop, hi) - lo
                ids += [str(x) for x in table.column(self.id_column).slice(a, b - a).to_pylist()]
                chunk = table.column(self.text_column).slice(a, b - a).to_pylist()
                for k, t in enumerate(chunk):
                    if not isinstance(t, str):
                        raise InputError(fmt(f"{self.path} row {lo + a + k} {self.text_column!r}",
                                             type(t).__name__, "a string"))
                texts += chunk
            lo = hi
        return ids, texts


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115 - caller closes


def _list_files(root: Path) -> list[str]:
    names = sorted(f.relative_to(root).as_posix() for f in root.rglob("*")
                   if f.is_file() and not any(s.startswith(".") for s in f.relative_to(root).parts))
    if not names:
        raise InputError(fmt("corpus input", f"no files in {root}", "a folder holding one text file per passage"))
    return names


def read_all(source: CorpusSource, block_size: int = 4096) -> tuple[list[str], list[str]]:
    """Every id and text of a source (tests, small corpora)."""
    ids: list[str] = []
    texts: list[str] = []
    for part in source.plan(block_size):
        a, b = source.read(part)
        ids += a
        texts += b
    return ids, texts


__all__ = ["KINDS", "CorpusSource", "Part", "read_all"]

