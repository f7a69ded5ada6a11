"""Retrieval evaluation on a BEIR-layout directory: nDCG@10, Recall@100, MRR@10.

Layout: ``corpus.jsonl(.gz)`` (``{"_id", "text", "title"?}``), ``queries.jsonl(.gz)``
(``{"_id", "text"}``), ``qrels.tsv`` (header, then ``query-id corpus-id score``) and an optional
``instruction.txt`` (the query task text: queries are embedded with
``Instruct: {task}\\nQuery: ``, documents without instruction).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk.errors import ArtifactError, fmt
from nvembed_sdk.train.readers import read_jsonl


@dataclass
class BeirSet:
    """A loaded BEIR-layout set."""

    doc_ids: list[str]
    docs: list[str]
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]
    instruction: str

    def subset(self, max_queries: int | None, max_corpus: int | None, seed: int = 0) -> BeirSet:
        """Seeded subset: ``max_queries`` queries; the corpus keeps their relevant documents plus
        random others up to ``max_corpus`` (a cheaper, still comparable-over-time dev signal)."""
        rng = random.Random(seed)
        qi = list(range(len(self.query_ids)))
        if max_queries and max_queries < len(qi):
            qi = sorted(rng.sample(qi, max_queries))
        qids = [self.query_ids[i] for i in qi]
        qrels = {q: self.qrels[q] for q in qids if q in self.qrels}
        di = list(range(len(self.doc_ids)))
        if max_corpus and max_corpus < len(di):
            relevant = {d for q in qrels.values() for d in q}
            keep = [i for i in di if self.doc_ids[i] in relevant]
            rest = [i for i in di if self.doc_ids[i] not in relevant]
            keep += rng.sample(rest, max(0, min(len(rest), max_corpus - len(keep))))
            di = sorted(keep)
        return BeirSet([self.doc_ids[i] for i in di], [self.docs[i] for i in di], qids,
                       [self.queries[i] for i in qi], qrels, self.instruction)


def _find(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (directory / name).is_file():
            return directory / name
    raise ArtifactError(fmt("BEIR dir", f"no {stem}.jsonl(.gz) in {directory}", "corpus, queries and qrels.tsv"))


def load_beir(directory: str | Path) -> BeirSet:
    """Read a BEIR-layout directory.

    Raises:
        ArtifactError: a file is missing.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(fmt("BEIR dir", f"{d} is not a directory", "a directory in the BEIR layout"))
    corpus = list(read_jsonl(_find(d, "corpus")))
    queries = list(read_jsonl(_find(d, "queries")))
    qrels_path = d / "qrels.tsv"
    if not qrels_path.is_file():
        qrels_path = d / "qrels" / "test.tsv"
    if not qrels_path.is_file():
        raise ArtifactError(fmt("BEIR dir", f"no qrels.tsv in {d}", "qrels.tsv (query-id, corpus-id, score)"))
    qrels: dict[str, dict[str, int]] = {}
    for n, line in enumerate(qrels_path.read_text(encoding="utf-8").splitlines()):
        parts = line.split("\t")
        if n == 0 and not parts[-1].strip().lstrip("-").isdigit():
            continue  # header
        if len(parts) >= 3 and int(parts[2]) > 0:
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    inst = d / "instruction.txt"
    instruction = inst.read_text(encoding="utf-8").strip("\n").strip() if inst.is_file() else ""
    docs = [(c.get("title", "") + " " + c["text"]).strip() if c.get("title") else c["text"] for c in corpus]
    return BeirSet([str(c["_id"]) for c in corpus], docs, [str(q["_id"]) for q in queries],
                   [q["text"] for q in queries], qrels, instruction)


def retrieval_metrics(scores: np.ndarray, beir: BeirSet) -> dict[str, float]:
    """nDCG@10 (graded gains, log2 discount), Recall@100 and MRR@10, averaged over queries with qrels.

    Args:
        scores: (Q, D) scores of ``beir.queries`` against ``beir.docs``.
        beir: the set.
    """
    k = min(100, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable"), 1)
    ndcg, recall, mrr = [], [], []
    for qi, qid in enumerate(beir.query_ids):
        rel = beir.qrels.get(qid)
        if not rel:
            continue
        ranked = [beir.doc_ids[j] for j in top[qi]]
        dcg = sum(rel.get(d, 0) / math.log2(r + 2) for r, d in enumerate(ranked[:10]))
        ideal = sorted(rel.values(), reverse=True)[:10]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        ndcg.append(dcg / idcg if idcg > 0 else 0.0)
        recall.append(sum(1 for d in ranked[:100] if d in rel) / len(rel))
        mrr.append(next((1.0 / (r + 1) for r, d in enumerate(ranked[:10]) if d in rel), 0.0))
    n = max(len(ndcg), 1)
    return {"ndcg@10": sum(ndcg) / n, "recall@100": sum(recall) / n, "mrr@10": sum(mrr) / n, "queries": len(ndcg)}


def evaluate_embedder(embedder: Any, beir: BeirSet, batch_size: int = 64, show_progress: bool = False,
                      query_max_length: int | None = None, doc_max_length: int | None = None) -> dict[str, float]:
    """Metrics of an :class:`nvembed_sdk.Embedder` (queries get ``instruction.txt``'s task)."""
    from nvembed_sdk.embedder import query_instruction

    prefix = query_instruction(beir.instruction) if beir.instruction else ""
    q = embedder.embed(beir.queries, instruction=prefix, batch_size=batch_size, show_progress=show_progress,
                       max_length=query_max_length)
    d = embedder.embed(beir.docs, batch_size=batch_size, show_progress=show_progress, max_length=doc_max_length)
    return retrieval_metrics(q @ d.T, beir)


def evaluate_bm25(beir: BeirSet, k1: float = 0.9, b: float = 0.4) -> dict[str, float]:
    """The lexical baseline: Okapi BM25 (k1 0.9, b 0.4, lower-cased ``\\w+`` tokens)."""
    from nvembed_sdk.train.bm25 import BM25

    return retrieval_metrics(BM25(beir.docs, k1, b).scores(beir.queries), beir)


def evaluate_artifact(artifact: str | Path, beir_dir: str | Path, batch_size: int = 64, device: str | None = None,
                      max_queries: int | None = None, max_corpus: int | None = None,
                      show_progress: bool = False, **options: Any) -> dict[str, float]:
    """nDCG@10, Recall@100, MRR@10 of any artifact ``Embedder.load`` reads, or of ``"bm25"``.

    Args:
        artifact: checkpoint dir, bundle dir, ``model.onnx``, ``engine.plan``, ``"bm25"``, or a
            sentence encoder (``"minilm"`` or a transformers encoder directory; mean pooling, no
            instruction), e.g. to compare with a distillation teacher.
        beir_dir: BEIR-layout directory.
        batch_size: texts per forward pass. Defaults to 64.
        device: device for the Embedder. Defaults to None (auto).
        max_queries: seeded query subset. Defaults to None (all).
        max_corpus: corpus subset (relevant documents always kept). Defaults to None (all).
        show_progress: tqdm bars. Defaults to False.
        **options: backend options for ``Embedder.load``.

    Returns:
        ``{"ndcg@10", "recall@100", "mrr@10", "queries"}``.
    """
    beir = load_beir(beir_dir).subset(max_queries, max_corpus)
    if str(artifact) == "bm25":
        return evaluate_bm25(beir)
    if str(artifact) == "minilm" or _is_encoder_dir(Path(artifact)):
        # A sentence encoder (e.g. a distillation teacher): mean pooling, no instruction.
        from nvembed_sdk.train.teachers import teacher_encoder

        enc = teacher_encoder(str(artifact), batch_size=batch_size, max_length=256, device=device)
        return retrieval_metrics(enc(beir.queries) @ enc(beir.docs).T, beir)
    from nvembed_sdk.embedder import Embedder

    with Embedder.load(artifact, device=device, **options) as emb:
        return evaluate_embedder(emb, beir, batch_size=batch_size, show_progress=show_progress)


def _is_encoder_dir(p: Path) -> bool:
    """A transformers model directory that is not an nvembed checkpoint or bundle."""
    from nvembed_sdk.train.teachers import _is_nvembed

    return p.is_dir() and (p / "config.json").is_file() and not (p / "nvembed.json").is_file() and not _is_nvembed(p)


__all__ = ["BeirSet", "evaluate_artifact", "evaluate_bm25", "evaluate_embedder", "load_beir", "retrieval_metrics"]
