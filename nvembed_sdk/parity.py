"""Parity: compare the final embeddings of two artifacts on real text.

A comparison returns a :class:`ParityReport`, truthy on pass, carrying the statistics and the
tolerance that *would* have passed. Cosine is computed per row (one text = one row), never
over the flattened batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk.errors import InputError, ShapeMismatch, ToleranceExceeded, fmt


@dataclass(frozen=True)
class Tolerance:
    """Budget per text: ``min_cosine`` per row and ``min_topk`` mean top-k overlap."""

    min_cosine: float
    min_topk: float

    def __post_init__(self) -> None:
        # A budget outside (0, 1] (e.g. --min-cosine -1, 2 or nan) would pass or fail anything.
        for name, lo_open in (("min_cosine", True), ("min_topk", False)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
                0 < v <= 1 if lo_open else 0 <= v <= 1)
            if not ok:
                raise InputError(fmt(f"parity budget {name}", repr(v),
                                     "a number in (0, 1]" if lo_open else "a number in [0, 1]"))


# README "Precision and parity budget". Retrieval for int8/fp8 is stated there as nDCG@10
# within 1 point; without labels we gate on top-10 agreement >= 0.9 (issue 5's figure).
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(0.99999, 1.0),
    "fp16": Tolerance(0.999, 0.95),
    "bf16": Tolerance(0.999, 0.95),
    "autocast": Tolerance(0.999, 0.95),
    "int8": Tolerance(0.99, 0.9),
    "fp8": Tolerance(0.99, 0.9),
}


def tolerance_for(precision: str) -> Tolerance:
    try:
        return DEFAULT_TOLERANCES[precision]
    except KeyError:
        raise InputError(fmt("precision", repr(precision), f"one of {sorted(DEFAULT_TOLERANCES)}")) from None


@dataclass
class ParityReport:
    """Result of :func:`compare_arrays` / :func:`compare`. ``bool(report)`` is the verdict."""

    reference: str
    candidate: str
    num_texts: int
    min_cosine: float
    mean_cosine: float
    max_abs_error: float
    topk_agreement: float
    k: int
    tolerance: Tolerance
    worst: list[tuple[float, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.min_cosine >= self.tolerance.min_cosine and self.topk_agreement >= self.tolerance.min_topk

    def __bool__(self) -> bool:
        return self.passed

    @property
    def would_pass_at(self) -> Tolerance:
        """The tightest tolerance these results meet."""
        return Tolerance(self.min_cosine, self.topk_agreement)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["worst"] = [{"cosine": c, "text": t[:200]} for c, t in self.worst]
        return d

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [
            f"parity {verdict}: {self.candidate} vs {self.reference} on {self.num_texts} texts",
            f"  per-row cosine  min {self.min_cosine:.7f}  mean {self.mean_cosine:.7f}  "
            f"(budget >= {self.tolerance.min_cosine})",
            f"  max abs error   {self.max_abs_error:.3e}",
            f"  top-{self.k} agreement {self.topk_agreement:.4f}  (budget >= {self.tolerance.min_topk})",
        ]
        for c, t in self.worst[:3]:
            lines.append(f"  worst {c:.7f}  {t[:70]!r}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def raise_if_failed(self) -> ParityReport:
        if not self.passed:
            raise ToleranceExceeded(
                fmt(f"parity {self.candidate}", f"min cosine {self.min_cosine:.7f}, top-{self.k} agreement "
                    f"{self.topk_agreement:.3f}", f"budget min cosine {self.tolerance.min_cosine}, "
                    f"top-{self.k} {self.tolerance.min_topk}"), report=self)
        return self


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-30)


def topk_agreement(ref_q: np.ndarray, ref_d: np.ndarray, cand_q: np.ndarray, cand_d: np.ndarray, k: int = 10) -> float:
    """Mean overlap of the top-k documents per query (1.0 = identical top-k sets)."""
    k = min(k, ref_d.shape[0])
    if k == 0 or ref_q.shape[0] == 0:
        return 1.0
    top_r = np.argsort(-(ref_q @ ref_d.T), axis=1, kind="stable")[:, :k]
    top_c = np.argsort(-(cand_q @ cand_d.T), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(r) & set(c)) / k for r, c in zip(top_r, top_c, strict=True)]))


def compare_arrays(
    reference: np.ndarray,
    candidate: np.ndarray,
    texts: Sequence[str] | None = None,
    tolerance: Tolerance | str = "fp32",
    queries: tuple[np.ndarray, np.ndarray] | None = None,
    k: int = 10,
    names: tuple[str, str] = ("reference", "candidate"),
) -> ParityReport:
    """Compare two (N, D) embedding arrays.

    Args:
        reference: (N, D) reference embeddings (documents).
        candidate: (N, D) candidate embeddings, same texts and order.
        texts: the N texts, to name the worst rows. Defaults to None.
        tolerance: a :class:`Tolerance` or a precision name. Defaults to ``"fp32"``.
        queries: (reference, candidate) query embeddings (M, D) for top-k retrieval agreement
            against the documents. Defaults to None: each document retrieves among the others.
        k: top-k. Defaults to 10.
        names: labels for the report.

    Raises:
        ShapeMismatch: the arrays differ in shape.
    """
    ref = np.asarray(reference, dtype=np.float32)
    cand = np.asarray(candidate, dtype=np.float32)
    if ref.shape != cand.shape or ref.ndim != 2:
        raise ShapeMismatch(fmt("embeddings", f"shapes {ref.shape} vs {cand.shape}", "equal (N, D) arrays"))
    tol = tolerance if isinstance(tolerance, Tolerance) else tolerance_for(tolerance)
    # Top-k agreement among n documents is trivially 1.0 when k >= n: k is lowered to n // 2
    # (and the report says so); fewer than 2 documents cannot measure retrieval at all.
    n_docs = ref.shape[0] - (0 if queries is not None else 1)
    notes = []
    if not isinstance(k, int) or k < 1:
        raise InputError(fmt("top-k", repr(k), "an int >= 1"))
    if n_docs < 2 * k:
        if n_docs // 2 < 1:
            raise InputError(fmt("parity texts", f"{ref.shape[0]} texts",
                                 f"at least {2 + (0 if queries is not None else 1)} (top-k is lowered to half "
                                 f"the documents below {2 * k}; pass more texts, e.g. omit --texts for the "
                                 "shipped held-out set)"))
        notes.append(f"top-k lowered from {k} to {n_docs // 2}: only {ref.shape[0]} texts "
                     f"(top-{k} of {n_docs} would always agree)")
        k = n_docs // 2
    rows = [row_cosine(ref, cand)]
    if queries is not None:
        rows.append(row_cosine(*queries))
        agree = topk_agreement(queries[0], ref, queries[1], cand, k)
        all_texts = list(texts or []) * 2
    else:
        agree = topk_agreement(ref, ref, cand, cand, k + 1)  # includes itself, so k+1
        all_texts = list(texts or [])
    cos = np.concatenate(rows) if rows[0].size else np.ones(0)
    order = np.argsort(cos)[:5]
    worst = [(float(cos[i]), all_texts[i] if i < len(all_texts) else f"row {i}") for i in order]
    abs_err = float(np.abs(ref - cand).max()) if ref.size else 0.0
    if queries is not None and queries[0].size:
        abs_err = max(abs_err, float(np.abs(queries[0] - queries[1]).max()))
    return ParityReport(
        reference=names[0], candidate=names[1], num_texts=int(ref.shape[0]),
        min_cosine=float(cos.min()) if cos.size else 1.0, mean_cosine=float(cos.mean()) if cos.size else 1.0,
        max_abs_error=abs_err, topk_agreement=agree, k=k, tolerance=tol, worst=worst, notes=notes,
    )


def compare(
    reference: Any,
    candidate: Any,
    texts: Sequence[str] | None = None,
    instruction: str | None = None,
    tolerance: Tolerance | str | None = None,
    min_cosine: float | None = None,
    batch_size: int = 16,
    k: int = 10,
) -> ParityReport:
    """Compare two artifacts (paths or :class:`Embedder`s) on real text.

    Texts are embedded as documents (no instruction) and as queries (with ``instruction``);
    per-row cosine covers both, and top-k agreement is measured for the queries against the
    documents.

    Args:
        reference: the reference artifact (usually the fp32 checkpoint).
        candidate: the artifact under test.
        texts: texts to compare on. Defaults to the SDK's held-out real text.
        instruction: query prefix. Defaults to the NV-Embed-v2 README's question instruction;
            pass ``""`` to compare documents only.
        tolerance: a :class:`Tolerance` or precision name. Defaults to the candidate's precision.
        min_cosine: override the per-row cosine budget. Defaults to None.
        batch_size: batch size for both. Defaults to 16.
        k: top-k for retrieval agreement. Defaults to 10.
    """
    from nvembed_sdk.embedder import DEFAULT_TASK, Embedder, query_instruction
    from nvembed_sdk.textsets import default_texts

    ref = reference if isinstance(reference, Embedder) else Embedder.load(reference, device="cpu")
    cand = candidate if isinstance(candidate, Embedder) else Embedder.load(candidate)
    if isinstance(texts, str):  # list("abc") compared three one-letter texts
        raise InputError(fmt("parity texts", "a str", "a list of texts (or None for the shipped held-out set)"))
    from nvembed_sdk.text import check_texts

    items = check_texts(texts) if texts is not None else default_texts("validation")
    # Repeated texts add nothing to a comparison, and their tied scores make top-k sets flip.
    unique = list(dict.fromkeys(items))
    dropped = len(items) - len(unique)
    items = unique
    ins = query_instruction(DEFAULT_TASK) if instruction is None else instruction
    tol = tolerance if tolerance is not None else tolerance_for(cand.precision)
    if isinstance(tol, str):
        tol = tolerance_for(tol)
    if min_cosine is not None:
        tol = Tolerance(min_cosine, tol.min_topk)
    docs = (ref.embed(items, batch_size=batch_size), cand.embed(items, batch_size=batch_size))
    queries = None
    if ins:
        queries = (ref.embed(items, instruction=ins, batch_size=batch_size),
                   cand.embed(items, instruction=ins, batch_size=batch_size))
    report = compare_arrays(docs[0], docs[1], items, tol, queries, k,
                            names=(_label(reference, ref), _label(candidate, cand)))
    if dropped:
        report.notes.append(f"{dropped} repeated texts compared once")
    if cand.emulated:
        report.notes.append("candidate numerics are emulated on this machine (FP8 Q/DQ on CPU)")
    return report


def _label(given: Any, emb: Any) -> str:
    path = given if isinstance(given, (str, Path)) else emb.runner.path
    return f"{path} [{emb.backend} {emb.precision}{' emulated' if emb.emulated else ''}]"


def assert_parity(reference: Any, candidate: Any, **kwargs: Any) -> ParityReport:
    """:func:`compare` and raise :class:`ToleranceExceeded` on failure (for users' CI)."""
    return compare(reference, candidate, **kwargs).raise_if_failed()
