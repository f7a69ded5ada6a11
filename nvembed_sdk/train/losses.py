"""Losses of NV-Embed training, each a small function on embeddings (no model) plus a module form.

* :func:`info_nce_loss` -- InfoNCE with hard and in-batch negatives, same-group columns masked
  (the contrastive term every stage uses); :func:`info_nce_logits` gives its logits.
* :func:`score_distill_loss` -- ``KL(teacher || student)`` over each query's own candidates,
  towards the teacher scores ``nvembed mine`` stores.
* :func:`embedding_distill_loss` -- ``1 - cos`` towards projected teacher embeddings
  (``nvembed_sdk.train.distill`` makes the targets).
* :func:`relation_distill_loss` -- ``KL(teacher || student)`` over each query's row of InfoNCE
  scores: the teacher's *similarity structure* (how it ranks every document of the batch).

:class:`StageLoss` composes them with the stage's weights (``TrainConfig.distill``); the plain
loss, the GradCache variant (``nvembed_sdk.train.gradcache``) and the data-parallel path
(embeddings gathered across ranks) all call the same functions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Logits(NamedTuple):
    """InfoNCE's scores of one batch: ``logits`` (B, C), ``target`` (B,), ``own`` (B, 1 + K)."""

    logits: torch.Tensor
    target: torch.Tensor
    own: torch.Tensor


def info_nce_logits(
    q: torch.Tensor,
    d: torch.Tensor,
    num_negatives: int,
    *,
    temperature: float = 0.05,
    in_batch_negatives: bool = True,
    query_groups: torch.Tensor | None = None,
    doc_groups: torch.Tensor | None = None,
) -> Logits:
    """InfoNCE (a softmax cross-entropy over documents) with hard and in-batch negatives.

    **What it optimises.** For query ``i`` with positive ``p_i`` and a candidate set ``C_i``,

        loss_i = -log( exp(s(q_i, p_i) / tau) / sum_{c in C_i} exp(s(q_i, c) / tau) )

    where ``s`` is the cosine similarity and ``tau`` the temperature; ``scale = 1 / tau``
    (sentence-transformers calls it ``scale``; tau 0.05 is scale 20). A small tau sharpens the
    softmax, so the hardest negatives dominate the gradient. The loss is the mean over queries:
    it pulls each query towards its positive and pushes it from the candidates, in proportion
    to how much probability each candidate steals.

    **Candidates.**

    * ``in_batch_negatives=False`` (NV-Embed stage 2): ``C_i`` is the query's own positive and
      its ``K`` hard negatives, (1 + K) logits per query.
    * ``in_batch_negatives=True`` (stage 1): ``C_i`` is every document of the batch, the other
      queries' positives *and* hard negatives included, (B * (1 + K)) logits per query. Any
      document whose group equals the query's group (a near-duplicate Debian sibling, another
      gloss of the same synset, another example of the same label) is a *false* negative and
      is masked to -inf, except the query's own positive.

    **Inputs.**

    Args:
        q: (B, D) query embeddings (normalised or not: they are normalised here).
        d: (B * (1 + K), D) document embeddings laid out ``[p_0, n_0_1..n_0_K, p_1, ...]``.
            Under data parallelism both are the gathered global batch.
        num_negatives: K, hard negatives per query.
        temperature: tau. Defaults to 0.05.
        in_batch_negatives: score against the whole batch. Defaults to True.
        query_groups: (B,) group ids of the queries. Defaults to None (no mask).
        doc_groups: (B * (1 + K),) group ids of the documents. Defaults to None.

    Returns:
        :class:`Logits`: the (B, C) logits, the (B,) target columns and the (B, 1 + K) logits
        of each query's own candidates (what :func:`score_distill_loss` compares).

    :func:`info_nce_loss` is the cross-entropy of these logits.

    **Related losses.** sentence-transformers' ``MultipleNegativesRankingLoss`` is this loss with
    in-batch negatives and no masking; ``CachedMultipleNegativesRankingLoss`` is its GradCache
    form; E5 and NV-Retriever use the same InfoNCE with mined hard negatives; a triplet loss
    keeps only one negative and a margin instead of the softmax.
    """
    K1 = 1 + num_negatives
    B = q.shape[0]
    q = F.normalize(q.float(), dim=-1)  # (B, D)
    d = F.normalize(d.float(), dim=-1)  # (B * K1, D)
    rows = torch.arange(B, device=q.device)
    if in_batch_negatives:
        logits = q @ d.T / temperature  # (B, B * K1)
        target = rows * K1  # column of each query's positive
        if query_groups is not None and doc_groups is not None:
            qg = query_groups.to(q.device)[rows]  # (B,)
            same = qg[:, None] == doc_groups.to(q.device)[None, :]  # (B, B * K1)
            same[rows, target] = False  # the own positive stays
            logits = logits.masked_fill(same, float("-inf"))
        own = logits.gather(1, (target[:, None] + torch.arange(K1, device=q.device)[None]))  # (B, K1)
    else:
        d_own = d[: B * K1].view(B, K1, -1)  # (B, K1, D)
        logits = torch.einsum("bd,bkd->bk", q, d_own) / temperature  # (B, K1)
        target = torch.zeros(B, dtype=torch.long, device=q.device)
        own = logits
    return Logits(logits, target, own)


def info_nce_loss(q: torch.Tensor, d: torch.Tensor, num_negatives: int, **kwargs) -> torch.Tensor:
    """InfoNCE: mean softmax cross-entropy of :func:`info_nce_logits` (same keyword arguments)."""
    scores = info_nce_logits(q, d, num_negatives, **kwargs)
    return F.cross_entropy(scores.logits, scores.target)


def score_distill_loss(own_logits: torch.Tensor, teacher_scores: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``KL(teacher || student)`` over each query's own (positive, negatives), batch mean.

    Args:
        own_logits: (B, 1 + K) student logits (``Logits.own``, already divided by its tau).
        teacher_scores: (B, 1 + K) teacher scores of the same candidates.
        temperature: the teacher softmax's temperature. Defaults to 1.0.

    The student learns the teacher's *ranking* of the candidates, not only which one is right
    (the margin-MSE / KL distillation of cross-encoder scores in dense retrieval).
    """
    t = F.softmax(teacher_scores.to(own_logits.device).float() / temperature, dim=-1)  # (B, K1)
    return F.kl_div(F.log_softmax(own_logits, dim=-1), t, reduction="batchmean")


def embedding_distill_loss(student: torch.Tensor, target: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between student rows (n, D) and teacher targets (n, D) where ``found`` (n,)."""
    if not bool(found.any()):
        return student.sum() * 0.0
    s = F.normalize(student[found.to(student.device)].float(), dim=-1)
    t = target[found].to(s.device)
    return (1.0 - (s * t).sum(-1)).mean()


def relation_distill_loss(
    logits: torch.Tensor,
    teacher_q: torch.Tensor,
    found_q: torch.Tensor,
    teacher_d: torch.Tensor,
    found_d: torch.Tensor,
    *,
    temperature: float = 0.05,
) -> torch.Tensor:
    """``KL(teacher || student)`` over each query's row of scores, batch mean over usable rows.

    The embedding term matches vectors one at a time; this term matches the teacher's scores of
    each query against every candidate of the batch (RKD / in-batch score distillation), so the
    student learns the teacher's ranking of near misses, not only of the positive.

    Args:
        logits: (B, C) student logits (:attr:`Logits.logits`: cosine / tau, same-group
            columns -inf). ``C`` is every document of the batch (in-batch negatives) or each
            query's own ``1 + K`` candidates.
        teacher_q: (B, D_t) the teacher's unit-norm query embeddings; ``found_q`` (B,) bool.
        teacher_d: (N, D_t) the teacher's unit-norm document embeddings in the layout of
            :func:`info_nce_logits` (``N == C``, or ``N == B * C`` for own candidates);
            ``found_d`` (N,) bool.
        temperature: divides the teacher cosines; the InfoNCE tau keeps both distributions
            on one scale. Defaults to 0.05.

    Columns the student masked or the teacher lacks drop out of both distributions; rows whose
    query the teacher lacks, or with fewer than two columns left, drop out of the mean.
    """
    B, C = logits.shape
    dev = logits.device
    tq, td = teacher_q.to(dev).float(), teacher_d.to(dev).float()
    found_d = found_d.to(dev)
    if td.shape[0] == C:
        t = tq @ td.T  # (B, C)
        col_found = found_d[None, :].expand(B, C)
    else:
        t = torch.einsum("bd,bkd->bk", tq, td[: B * C].view(B, C, -1))  # (B, C)
        col_found = found_d[: B * C].view(B, C)
    keep = torch.isfinite(logits) & col_found  # (B, C)
    rows = found_q.to(dev) & (keep.sum(1) >= 2)  # (B,)
    if not bool(rows.any()):
        return logits.masked_fill(~keep, 0.0).sum() * 0.0
    keep = keep[rows]
    # A large finite fill, not -inf: the masked entries get probability 0 in both without NaN.
    log_ps = F.log_softmax(logits[rows].masked_fill(~keep, -1e4), dim=-1)  # (R, C)
    log_pt = F.log_softmax((t[rows] / temperature).masked_fill(~keep, -1e4), dim=-1)  # (R, C)
    kl = torch.where(keep, log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_ps))
    return kl.sum(-1).mean()


def compute_loss_from_embeddings(
    q: torch.Tensor,
    d: torch.Tensor,
    num_negatives: int,
    temperature: float = 0.05,
    in_batch_negatives: bool = True,
    query_groups: torch.Tensor | None = None,
    doc_groups: torch.Tensor | None = None,
    *,
    teacher_scores: torch.Tensor | None = None,
    distill_weight: float = 0.0,
    distill_temperature: float = 1.0,
) -> torch.Tensor:
    """InfoNCE plus, when ``teacher_scores`` are given and ``distill_weight > 0``, the weighted
    :func:`score_distill_loss` (see :func:`info_nce_logits` for the arguments)."""
    scores = info_nce_logits(q, d, num_negatives, temperature=temperature, in_batch_negatives=in_batch_negatives,
                             query_groups=query_groups, doc_groups=doc_groups)
    return _scored_loss(scores, teacher_scores, distill_weight, distill_temperature)


def _scored_loss(scores: Logits, teacher_scores: torch.Tensor | None, weight: float, temperature: float) -> torch.Tensor:
    """InfoNCE's cross-entropy of ``scores`` plus the weighted score KL term when teacher scores are given."""
    loss = F.cross_entropy(scores.logits, scores.target)
    if teacher_scores is not None and weight > 0:
        loss = loss + weight * score_distill_loss(scores.own, teacher_scores, temperature=temperature)
    return loss


class StageLoss:
    """One stage's objective on the global batch's embeddings: InfoNCE, plus the score KL term
    when the batch carries teacher scores, plus the embedding term when targets are given, plus
    the relation term when the teacher's own rows are given.

    Args:
        temperature: InfoNCE tau. in_batch_negatives: score against the whole batch.
        score_weight / score_temperature: the KL term (0: off).
        embedding_weight: the ``1 - cos`` term (0: off).
        relation_weight / relation_temperature: :func:`relation_distill_loss` (0: off).
    """

    def __init__(self, *, temperature: float, in_batch_negatives: bool, score_weight: float = 0.0,
                 score_temperature: float = 1.0, embedding_weight: float = 0.0, relation_weight: float = 0.0,
                 relation_temperature: float = 0.05) -> None:
        self.temperature = temperature
        self.in_batch_negatives = in_batch_negatives
        self.score_weight = score_weight
        self.score_temperature = score_temperature
        self.embedding_weight = embedding_weight
        self.relation_weight = relation_weight
        self.relation_temperature = relation_temperature

    def __call__(self, q: torch.Tensor, d: torch.Tensor, batch, targets=None, teacher_rows=None) -> torch.Tensor:
        """``q`` (B, D), ``d`` (B * (1 + K), D), a ``TrainBatch``; ``targets``: ``(rows, found)``
        teacher targets of ``cat([q, d])`` or None; ``teacher_rows``: ``(tq, fq, td, fd)`` the
        teacher's own unit rows of the queries and documents with their found masks, or None."""
        scores = info_nce_logits(q, d, batch.num_negatives, temperature=self.temperature,
                                 in_batch_negatives=self.in_batch_negatives, query_groups=batch.query_groups,
                                 doc_groups=batch.doc_groups)
        loss = _scored_loss(scores, batch.teacher_scores, self.score_weight, self.score_temperature)
        if targets is not None and self.embedding_weight > 0:
            loss = loss + self.embedding_weight * embedding_distill_loss(torch.cat([q, d]), *targets)
        if teacher_rows is not None and self.relation_weight > 0:
            loss = loss + self.relation_weight * relation_distill_loss(scores.logits, *teacher_rows,
                                                                       temperature=self.relation_temperature)
        return loss


class InfoNCELoss(nn.Module):
    """Module form of :func:`compute_loss_from_embeddings` around a model.

    Args:
        model: maps ``(input_ids, attention_mask, pool_mask)`` to (N, D) embeddings.
        temperature: tau (scale = 1 / tau). Defaults to 0.05.
        in_batch_negatives: see :func:`info_nce_logits`. Defaults to True.
        distill_weight: KL weight towards teacher scores. Defaults to 0.
        distill_temperature: teacher softmax temperature. Defaults to 1.0.
    """

    def __init__(self, model: nn.Module, temperature: float = 0.05, in_batch_negatives: bool = True,
                 distill_weight: float = 0.0, distill_temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.objective = StageLoss(temperature=temperature, in_batch_negatives=in_batch_negatives,
                                   score_weight=distill_weight, score_temperature=distill_temperature)

    def embed(self, enc) -> torch.Tensor:
        return self.model(enc.input_ids, enc.attention_mask, enc.pool_mask)

    def loss_from_embeddings(self, q: torch.Tensor, d: torch.Tensor, batch) -> torch.Tensor:
        return self.objective(q, d, batch)

    def forward(self, batch) -> torch.Tensor:
        """Loss of one :class:`nvembed_sdk.train.batch.TrainBatch` (single process)."""
        return self.loss_from_embeddings(self.embed(batch.queries), self.embed(batch.docs), batch)


__all__ = ["InfoNCELoss", "Logits", "StageLoss", "compute_loss_from_embeddings", "embedding_distill_loss",
           "info_nce_logits", "info_nce_loss", "relation_distill_loss", "score_distill_loss"]
