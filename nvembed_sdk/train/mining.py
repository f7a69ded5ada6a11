"""Positive-aware hard-negative mining (NV-Retriever's TopK-PercPos).

For each query a teacher scores every candidate document (the positives of the whole file);
walking down the ranking, a candidate is **kept** when

* it is not the query's positive (identical text),
* it is not of the query's group (same Debian source, same synset, ...) and is not a positive
  of another record with the same query text (multi-positive queries), and
* its teacher score is below ``margin x`` the positive's score (0.95 by default): anything
  scored almost as high as the positive is more likely an unlabelled positive than a negative.

With ``drop_mentions`` (``nvembed mine --drop-query-mentions``) candidates that contain the query
verbatim are skipped too: for term -> definition pairs those are unlabelled positives; and
``term_margin`` relaxes the margin for short (term) queries, whose positive a weak teacher often
ranks below passages that are plainly wrong.

The first ``num_negatives`` kept candidates are written, hardest first, with their groups and
the teacher scores ``[positive, *negatives]`` (for optional distillation).

The teachers (BM25, an nvembed artifact, a transformers encoder) live in
:mod:`nvembed_sdk.train.teachers`; they are re-exported here, where ``nvembed mine`` finds them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from nvembed_sdk.train.readers import Example, norm_text
from nvembed_sdk.train.teachers import BM25Teacher, DenseTeacher, Teacher, load_teacher


def mine_hard_negatives(
    examples: Sequence[Example],
    teacher: Teacher,
    num_negatives: int = 7,
    margin: float = 0.95,
    top_k: int = 100,
    block: int = 256,
    keep_existing: bool = True,
    show_progress: bool = True,
    term_margin: float | None = None,
    term_words: int = 4,
    drop_mentions: bool = False,
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
        term_margin: margin for term queries (at most ``term_words`` words) instead of
            ``margin``; ``inf`` turns the check off for them. A term ("SAX2", "multiplexer")
            that the teacher ranks below other passages gets no negative at all under 0.95,
            exactly where the model most needs one; with ``drop_mentions`` removing the
            passages that name the term, a passage ranked above the positive is a real
            negative. Defaults to None (``margin``).
        term_words: longest query, in words, that counts as a term. Defaults to 4.
        drop_mentions: skip every candidate (and existing negative) that contains the query
            verbatim (:func:`mentions`): for a term -> definition record ("SAX2" -> a
            description using "SAX2") a passage naming the term is as likely a second right
            answer as a wrong one, and a teacher ranks such passages high precisely because they
            share the term. Long queries (summaries, questions) almost never occur verbatim.
            Defaults to False.

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
    pool_lower = [p.lower() for p in pool] if drop_mentions else []  # lowered once, searched per query
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
            m = term_margin if term_margin is not None and len(e.query.split()) <= term_words else margin
            named = _mention_pattern(e.query).search if drop_mentions else None  # on lower-cased text
            pos_j = pool_index[e.positive]
            pos_score = float(s[r, pos_j])
            banned = positives_of_query[norm_text(e.query)] | {pos_j}
            negs: list[str] = []
            groups: list[str] = []
            scores: list[float] = []
            if keep_existing:
                for n in e.negatives[:num_negatives]:
                    if n == e.positive or n in negs or (named and named(n.lower())):
                        continue
                    j = pool_index.get(n)
                    negs.append(n)
                    groups.append(sorted(pool_groups[j])[0] if j is not None else "")
                    scores.append(float(s[r, j]) if j is not None else float("nan"))
            for j in cand[r]:
                if len(negs) >= num_negatives:
                    break
                j = int(j)
                if j in banned or e.group in pool_groups[j] or pool[j] in negs or (named and named(pool_lower[j])):
                    continue
                if m != float("inf") and not s[r, j] < m * pos_score:  # TopK-PercPos: too close to the positive
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


def _mention_pattern(query: str) -> re.Pattern[str]:
    """``query`` lower-cased, on word boundaries ("FX" does not match "ffx"); search lower-cased text."""
    return re.compile(r"(?<![0-9a-z])" + re.escape(query.strip().lower()) + r"(?![0-9a-z])")


def mentions(query: str):
    """A predicate: does a text contain ``query`` verbatim (case-insensitive, on word boundaries)?"""
    pat = _mention_pattern(query)
    return lambda text: pat.search(text.lower()) is not None


__all__ = ["BM25Teacher", "DenseTeacher", "Teacher", "load_teacher", "mentions", "mine_hard_negatives"]
