"""Validate an exported bundle against the PyTorch fp32 reference on shapes the trace never saw.

Batch 1, odd batches, odd lengths and a text truncated at ``max_length`` are run through both
the reference and the bundle; per-row cosine and top-k agreement are compared against the
README budget of the bundle's precision. The report goes into ``nvembed.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk.embedder import DEFAULT_TASK, Embedder, query_instruction
from nvembed_sdk.exporters.staging import final_path
from nvembed_sdk.manifest import read_manifest, write_manifest
from nvembed_sdk.parity import ParityReport, Tolerance, compare_arrays, tolerance_for
from nvembed_sdk.textsets import default_texts


def _probes(texts: list[str], max_length: int) -> list[tuple[str, list[str], str, int]]:
    """(label, texts, instruction, batch_size) groups; the trace used batch 3 x seq 6."""
    ins = query_instruction(DEFAULT_TASK)
    long_text = " ".join(texts)  # far beyond max_length once tokenised: truncated to exactly max_length
    odd = [t[: 37 + 13 * i] for i, t in enumerate(texts[:5])]  # odd character (hence token) lengths
    mixed = [t[: 23 + 61 * i] for i, t in enumerate(texts[1:8])]
    return [
        ("batch 1 document", [texts[0][:101]], "", 1),
        ("batch 5 queries, odd lengths", odd, ins, 5),
        ("batch 7 documents, mixed lengths", mixed, "", 7),
        (f"batch 2, one text truncated at max_length={max_length}", [long_text, texts[8]], "", 2),
        ("batch 1 query", texts[9:10], ins, 1),
    ]


def validate_export(
    checkpoint: str | Path,
    bundle: str | Path,
    texts: list[str] | None = None,
    tolerance: Tolerance | None = None,
    backend: str = "onnxruntime",
    write: bool = True,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Compare ``bundle`` with the fp32 PyTorch checkpoint and record the report.

    Args:
        checkpoint: the source checkpoint directory.
        bundle: the exported bundle directory.
        texts: real texts (at least 10). Defaults to the SDK's held-out validation text.
        tolerance: budget. Defaults to the bundle precision's README budget.
        backend: backend that runs the bundle. Defaults to onnxruntime (CPU).
        write: store the report under ``validation`` in ``nvembed.json``. Defaults to True.
        raise_on_failure: raise :class:`ToleranceExceeded` outside the budget. Defaults to True.

    Returns:
        The :class:`ParityReport` (truthy on pass).
    """
    manifest = read_manifest(bundle)
    precision = manifest.get("precision", "fp32")
    tol = tolerance or tolerance_for(precision)
    ref = Embedder.load(checkpoint, device="cpu", precision="fp32")
    cand = Embedder.load(bundle, backend=backend, device="cpu")
    items = list(texts or default_texts("validation"))
    if len(items) < 10:
        items = (items * 10)[:10]
    max_length = int(manifest.get("text", {}).get("max_length") or ref.text.max_length)
    ref_rows, cand_rows, labels, shapes = [], [], [], []
    for label, group, ins, bs in _probes(items, max_length):
        ref_rows.append(ref.embed(group, instruction=ins, batch_size=bs))
        cand_rows.append(cand.embed(group, instruction=ins, batch_size=bs))
        labels += [f"[{label}] {t[:80]}" for t in group]
        lengths = [len(r) for r in cand.text.tokenize(group, ins)]
        shapes.append({"probe": label, "batch": len(group), "seq": max(lengths), "lengths": lengths})
    # Retrieval agreement on the whole validation set (documents vs the same texts as queries).
    ins = query_instruction(DEFAULT_TASK)
    q = (ref.embed(items, instruction=ins), cand.embed(items, instruction=ins))
    docs = (ref.embed(items), cand.embed(items))
    retrieval = compare_arrays(docs[0], docs[1], items, tol, queries=q)
    probes = compare_arrays(np.concatenate(ref_rows), np.concatenate(cand_rows), labels, tol)
    report = ParityReport(
        reference=f"{checkpoint} [torch fp32]", candidate=f"{final_path(bundle)} [{cand.backend} {precision}]",
        num_texts=probes.num_texts + retrieval.num_texts,
        min_cosine=min(probes.min_cosine, retrieval.min_cosine),
        mean_cosine=float(np.mean([probes.mean_cosine, retrieval.mean_cosine])),
        max_abs_error=max(probes.max_abs_error, retrieval.max_abs_error),
        topk_agreement=retrieval.topk_agreement, k=retrieval.k, tolerance=tol,
        worst=sorted(probes.worst + retrieval.worst)[:5],
        notes=[f"emulated on {cand.device}"] if cand.emulated else [],
    )
    if write:
        data: dict[str, Any] = dict(manifest)
        data.pop("format_version", None)
        data["validation"] = {**report.to_dict(), "shapes": shapes, "backend": f"{cand.backend} on {cand.device}"}
        write_manifest(bundle, data)
    cand.close()
    if raise_on_failure:
        report.raise_if_failed()
    return report
