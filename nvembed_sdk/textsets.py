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
    lines = _read_lines(p)
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
            if not isinstance(rec, dict):
                raise InputError(fmt(f"{p}:{i + 1}", f"a JSON {type(rec).__name__}",
                                     "one JSON object per line, e.g. {\"text\": \"...\"}"))
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


def _read_lines(p: Path) -> list[str]:
    """The lines of a UTF-8 text file (gzip if named .gz); a binary or non-UTF-8 file is an
    InputError naming the file and the line."""
    with open(p, "rb") as fh:
        raw = fh.read()
    if p.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise InputError(fmt(str(p), f"not a readable gzip file ({exc})", "a .gz file written by gzip")) from None
    if b"\x00" in raw[:65536]:
        raise InputError(fmt(str(p), "a binary file (NUL bytes)", "UTF-8 text: one text per line, or JSONL"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(fmt(f"{p}:{line}", f"bytes that are not UTF-8 ({exc.reason} at byte {exc.start})",
                             "UTF-8 text; convert it first, e.g. iconv -f latin1 -t utf-8")) from None
    return text.splitlines()


# Below this many texts, INT8/FP8 calibration ranges are too noisy to pass the budget (a 2-line
# file ran two minutes, then failed the tolerance); the shipped set has 256.
MIN_CALIBRATION_TEXTS = 16


def check_calibration_texts(texts: list[str], source: str | Path, minimum: int = MIN_CALIBRATION_TEXTS) -> list[str]:
    """Refuse a calibration set too small to calibrate on, before the long work starts.

    Raises:
        InputError: fewer than ``minimum`` texts, or texts that are all empty.
    """
    n = len([t for t in texts if t.strip()])
    if n < minimum:
        raise InputError(fmt(f"calibration texts {source}", f"{n} texts",
                             f"at least {minimum} (256 recommended) representative texts, or omit --calibration "
                             "to use the shipped set"))
    return texts
