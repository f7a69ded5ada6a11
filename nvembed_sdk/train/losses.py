"""Contrastive loss of NV-Embed training: InfoNCE with hard negatives.

The maths lives in :func:`compute_loss_from_embeddings`, which takes embeddings and no model,
so the plain loss, the GradCache variant (``nvembed_sdk.train.gradcache``) and the
data-parallel path (embeddings gathered across ranks) all share it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compute_loss_from_embeddings(
    q: torch.Tensor,
    d: torch.Tensor,
    num_negatives: int,
    temperature: float = 0.05,
    in_batch_negatives: bool = True,
    query_groups: torch.Tensor | None = None,
    doc_groups: torch.Tensor | None = None,
    query_offset: int = 0,
    teacher_scores: torch.Tensor | None = None,
    distill_weight: float = 0.0,
    distill_temperature: float = 1.0,
) -> torch.Tensor:
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
            With in-batch negatives ``d`` may hold more rows than ``q`` (every rank's
            documents) and ``query_offset`` places ``q`` in it.
        num_negatives: K, hard negatives per query.
        temperature: tau. Defaults to 0.05.
        in_batch_negatives: score against the whole batch. Defaults to True.
        query_groups: (B_all,) group ids of the queries of ``d``'s batch. Defaults to None (no mask).
        doc_groups: (B_all * (1 + K),) group ids of the documents. Defaults to None.
        query_offset: index of ``q[0]`` among ``d``'s queries (data-parallel: rank * local B).
            Defaults to 0.
        teacher_scores: (B, 1 + K) teacher scores of (positive, negatives), for an optional
            distillation term ``KL(teacher || student)`` over each query's own candidates.
            Defaults to None.
        distill_weight: weight of the KL term. Defaults to 0 (off).
        distill_temperature: temperature of the teacher's softmax. Defaults to 1.0.

    Returns:
        Scalar loss (mean over the queries of ``q``).

    **Related losses.** sentence-transformers' ``MultipleNegativesRankingLoss`` is this loss with
    in-batch negatives and no masking; ``CachedMultipleNegativesRankingLoss`` is its GradCache
    form; E5 and NV-Retriever use the same InfoNCE with mined hard negatives; a triplet loss
    keeps only one negative and a margin instead of the softmax.
    """
    K1 = 1 + num_negatives
    B = q.shape[0]
    q = F.normalize(q.float(), dim=-1)  # (B, D)
    d = F.normalize(d.float(), dim=-1)  # (B_all * K1, D)
    rows = torch.arange(B, device=q.device)
    if in_batch_negatives:
        logits = q @ d.T / temperature  # (B, B_all * K1)
        target = (rows + query_offset) * K1  # column of each query's positive
        if query_groups is not None and doc_groups is not None:
            qg = query_groups.to(q.device)[rows + query_offset]  # (B,)
            same = qg[:, None] == doc_groups.to(q.device)[None, :]  # (B, B_all * K1)
            same[rows, target] = False  # the own positive stays
            logits = logits.masked_fill(same, float("-inf"))
        own = logits.gather(1, (target[:, None] + torch.arange(K1, device=q.device)[None]))  # (B, K1)
    else:
        start = query_offset * K1
        d_own = d[start : start + B * K1].view(B, K1, -1)  # (B, K1, D)
        logits = torch.einsum("bd,bkd->bk", q, d_own) / temperature  # (B, K1)
        target = torch.zeros(B, dtype=torch.long, device=q.device)
        own = logits
    loss = F.cross_entropy(logits, target)
    if teacher_scores is not None and distill_weight > 0:
        # Student distribution over the query's own (positive, negatives) vs the teacher's.
        t = F.softmax(teacher_scores.to(q.device).float() / distill_temperature, dim=-1)  # (B, K1)
        s = F.log_softmax(own, dim=-1)
        loss = loss + distill_weight * F.kl_div(s, t, reduction="batchmean")
    return loss


class InfoNCELoss(nn.Module):
    """Module form of :func:`compute_loss_from_embeddings` around a model.

    Args:
        model: maps ``(input_ids, attention_mask, pool_mask)`` to (N, D) embeddings.
        temperature: tau (scale = 1 / tau). Defaults to 0.05.
        in_batch_negatives: see :func:`compute_loss_from_embeddings`. Defaults to True.
        distill_weight: KL weight towards teacher scores. Defaults to 0.
        distill_temperature: teacher softmax temperature. Defaults to 1.0.
    """

    def __init__(self, model: nn.Module, temperature: float = 0.05, in_batch_negatives: bool = True,
                 distill_weight: float = 0.0, distill_temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.in_batch_negatives = in_batch_negatives
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature

    def embed(self, enc) -> torch.Tensor:
        return self.model(enc.input_ids, enc.attention_mask, enc.pool_mask)

    def loss_from_embeddings(self, q: torch.Tensor, d: torch.Tensor, batch, query_offset: int = 0) -> torch.Tensor:
        return compute_loss_from_embeddings(
            q, d, batch.num_negatives, self.temperature, self.in_batch_negatives,
            batch.query_groups, batch.doc_groups, query_offset, batch.teacher_scores,
            self.distill_weight, self.distill_temperature)

    def forward(self, batch) -> torch.Tensor:
        """Loss of one :class:`nvembed_sdk.train.data.TrainBatch` (single process)."""
        return self.loss_from_embeddings(self.embed(batch.queries), self.embed(batch.docs), batch)


__all__ = ["InfoNCELoss", "compute_loss_from_embeddings"]
