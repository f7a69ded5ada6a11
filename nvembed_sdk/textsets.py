"""Real text for validation, parity, benchmarks and calibration, and readers for user files."""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from nvembed_sdk.errors import InputError, fmt

SAMPLE = "python-docs-sample.jsonl.gz"


def _records() -> list[dict]:
    data = resources.files("nvembed_sdk").joinpath("data", SAMPLE).read_bytes()
    return [json.loads(line) for line in gzip.decompress(data).decode("utf-8").splitlines() if line.strip()]


def default_texts(split: str = "validation", kind: str | None = None) -> list[str]:
    """Shipped real texts (Python documentation passages and query-like strings).

    Args:
        split: ``validation`` (held out) or ``calibration``. Defaults to validation.
        kind: ``passage``, ``query`` or None for both. Defaults to None.
    """
    if split not in ("validation", "calibration"):
        raise InputError(fmt("split", repr(split), "'validation' or 'calibration'"))
    return [r["text"] for r in _records() if r["split"] == split and (kind is None or r["kind"] == kind)]


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts from a plain file (one per line) or JSONL(.gz) with a ``text`` (or ``query`` /
    ``positive``) field.

    Raises:
        InputError: missing file, or no texts in it.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(fmt("texts file", f"{p} does not exist", "a .txt (one text per line) or .jsonl(.gz) file"))
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        lines = [line.rstrip("\n") for line in fh]
    jsonl = p.name.endswith((".jsonl", ".jsonl.gz", ".json"))
    out: list[str] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if jsonl:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(fmt(f"{p}:{i + 1}", f"invalid JSON ({exc})", "one JSON object per line")) from exc
            for key in ("text", "query", "positive"):
                if isinstance(rec.get(key), str):
                    out.append(rec[key])
                    break
        else:
            out.append(line)
        if limit and len(out) >= limit:
            break
    if not out:
        raise InputError(fmt("texts file", f"{p} holds no texts", "one text per line, or JSONL with 'text'"))
    return out
