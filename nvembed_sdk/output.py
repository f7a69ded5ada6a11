"""Embedding output options: ``precision`` (float32, int8, uint8, binary, ubinary) and ``truncate_dim``.

The int8/uint8 buckets come from calibration ranges stored with the model
(``embedding_output.json``: per-dimension min and max of the model's embeddings of real
calibration texts, for the full width and for each declared truncation width), never from the batch being quantised: a range computed from the batch
makes the same text quantise differently depending on its neighbours. The bucket rule is
sentence-transformers' ``quantize_embeddings(..., ranges=...)``: 256 equal steps between min
and max per dimension, values outside clipped. binary/ubinary pack ``x > 0`` bits (8 dims per
byte; binary shifts by -128 into int8) and need no ranges.

``truncate_dim`` keeps the first dims and renormalises; it is allowed only for dims the model
declares (``truncate_dims``, e.g. a Matryoshka-trained model), because truncating a model that
was not trained for it silently loses quality.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk.errors import ArtifactError, InputError, fmt

OUTPUT_FILE = "embedding_output.json"
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


@dataclass(frozen=True)
class OutputSpec:
    """What a model declares about its outputs.

    Attributes:
        ranges: width -> (2, width) float32, per-dimension min (row 0) and max (row 1) of the
            calibration embeddings at that width (truncated ones renormalised first); empty
            when the model has no calibration (int8/uint8 then refuse).
        truncate_dims: widths ``truncate_dim`` may take. Defaults to none.
        calibration: where the ranges came from (texts, count).
    """

    ranges: dict[int, np.ndarray] = field(default_factory=dict)
    truncate_dims: tuple[int, ...] = ()
    calibration: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, directory: str | Path) -> OutputSpec:
        """Read ``embedding_output.json`` from an artifact directory (an empty spec when absent)."""
        path = Path(directory) / OUTPUT_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            ranges = {int(w): np.asarray([r["min"], r["max"]], dtype=np.float32)
                      for w, r in data.get("ranges", {}).items()}
            dims = tuple(int(d) for d in data.get("truncate_dims", ()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(fmt(str(path), f"unreadable ({exc})",
                                    "JSON with ranges {width: {min: [..], max: [..]}} and truncate_dims [int]")) from exc
        for w, arr in ranges.items():
            if arr.shape != (2, w) or not np.all(arr[1] >= arr[0]):
                raise ArtifactError(fmt(str(path), f"ranges[{w}] of shape {arr.shape}",
                                        f"min and max lists of {w} values, min <= max"))
        return cls(ranges, dims, dict(data.get("calibration", {})))

    def write(self, directory: str | Path) -> Path:
        """Write ``embedding_output.json`` atomically (temporary file, then rename)."""
        path = Path(directory) / OUTPUT_FILE
        data: dict[str, Any] = {"truncate_dims": list(self.truncate_dims), "calibration": self.calibration}
        data["ranges"] = {str(w): {"min": [float(x) for x in r[0]], "max": [float(x) for x in r[1]]}
                          for w, r in sorted(self.ranges.items(), reverse=True)}
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")  # one line: 2 x D floats per width
        tmp.replace(path)
        return path


def calibrate(embedder: Any, texts: Sequence[str] | None = None, truncate_dims: Sequence[int] = (),
              task: str | None = None, batch_size: int = 32) -> OutputSpec:
    """Per-dimension ranges of an :class:`~nvembed_sdk.Embedder`'s embeddings of calibration texts.

    Each text is embedded both as a document and as a query (so both sides of retrieval fall
    inside the buckets).

    Args:
        embedder: a loaded Embedder.
        texts: calibration texts. Defaults to the SDK's shipped calibration split.
        truncate_dims: widths the model declares for ``truncate_dim``. Defaults to none.
        task: query task. Defaults to the SDK's default task.
        batch_size: texts per forward pass. Defaults to 32.

    Returns:
        The spec (write it with :meth:`OutputSpec.write`).
    """
    from nvembed_sdk.embedder import DEFAULT_TASK
    from nvembed_sdk.textsets import default_texts

    items = list(texts) if texts is not None else default_texts("calibration")
    if len(items) < 2:
        raise InputError(fmt("calibration texts", f"{len(items)} texts", "at least 2 (hundreds are better)"))
    dims = tuple(sorted({int(d) for d in truncate_dims}, reverse=True))
    bad = [d for d in dims if not 0 < d <= embedder.dim]
    if bad:
        raise InputError(fmt("truncate_dims", bad, f"widths in 1..{embedder.dim}"))
    docs = embedder.embed_documents(items, batch_size=batch_size)
    queries = embedder.embed_queries(items, task=task or DEFAULT_TASK, batch_size=batch_size)
    both = np.concatenate([docs, queries])  # (2N, D)
    ranges = {}
    for width in (embedder.dim, *dims):
        part = truncate(both, width, OutputSpec(truncate_dims=dims))  # (2N, width), renormalised
        ranges[width] = np.stack([part.min(axis=0), part.max(axis=0)]).astype(np.float32)
    source = "nvembed_sdk calibration split" if texts is None else "user texts"
    return OutputSpec(ranges, dims, {"texts": len(items), "source": source, "sides": ["document", "query"]})


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(fmt("precision", repr(precision), f"one of {list(PRECISIONS)}"))
    return precision


def truncate(emb: np.ndarray, dim: int | None, spec: OutputSpec, normalize: bool = True) -> np.ndarray:
    """Keep the first ``dim`` dims of (N, D) or (D,) embeddings, renormalised when ``normalize``.

    Raises:
        InputError: ``dim`` is not one the model declares.
    """
    if dim is None or dim == emb.shape[-1]:
        return emb
    if int(dim) not in spec.truncate_dims:
        declared = list(spec.truncate_dims) or "none"
        raise InputError(fmt("truncate_dim", dim, f"this model declares truncate_dims {declared} in {OUTPUT_FILE} "
                                                  "(a model not trained for truncation loses quality silently)"))
    out = np.ascontiguousarray(emb[..., : int(dim)])
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out.astype(np.float32, copy=False)


def quantize(emb: np.ndarray, precision: str, spec: OutputSpec) -> np.ndarray:
    """(N, d) float32 -> the requested precision, with the model's stored ranges for int8/uint8.

    Returns:
        float32 (N, d), int8/uint8 (N, d), or int8/uint8 (N, ceil(d / 8)) for binary/ubinary.

    Raises:
        InputError: unknown precision, or int8/uint8 for a model without stored ranges.
    """
    check_precision(precision)
    emb = np.asarray(emb, dtype=np.float32)
    if precision == "float32":
        return emb
    if precision == "binary":
        return (np.packbits(emb > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)
    if precision == "ubinary":
        return np.packbits(emb > 0, axis=-1)
    d = emb.shape[-1]
    if d not in spec.ranges:
        got = f"ranges for widths {sorted(spec.ranges)}" if spec.ranges else f"a model without {OUTPUT_FILE} ranges"
        raise InputError(fmt(f"precision {precision!r} at width {d}", got,
                             "calibrate it once: nvembed calibrate MODEL (ranges are never taken from the batch)"))
    starts = spec.ranges[d][0]
    steps = (spec.ranges[d][1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    q = np.clip(np.floor((emb - starts) / steps), 0, 255)
    return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)


def apply(emb: np.ndarray, spec: OutputSpec, precision: str = "float32", truncate_dim: int | None = None,
          normalize: bool = True) -> np.ndarray:
    """Truncate (declared dims only), then quantise with the stored ranges."""
    check_precision(precision)
    return quantize(truncate(emb, truncate_dim, spec, normalize), precision, spec)


__all__ = ["OUTPUT_FILE", "PRECISIONS", "OutputSpec", "apply", "calibrate", "quantize", "truncate"]
