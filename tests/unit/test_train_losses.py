"""InfoNCE maths against a reference written out in the test, and GradCache's gradient equality."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from nvembed_sdk.train.data import Encoded
from nvembed_sdk.train.gradcache import cached_backward
from nvembed_sdk.train.losses import InfoNCELoss, compute_loss_from_embeddings


def _reference(q, d, K, tau, in_batch, qg=None, dg=None):
    """Loop form of the loss, one query at a time."""
    q = torch.nn.functional.normalize(q.double(), dim=-1)
    d = torch.nn.functional.normalize(d.double(), dim=-1)
    total = 0.0
    for i in range(q.shape[0]):
        pos = i * (1 + K)
        cols = range(d.shape[0]) if in_batch else range(pos, pos + 1 + K)
        logits = []
        for c in cols:
            if in_batch and qg is not None and c != pos and int(dg[c]) == int(qg[i]):
                continue  # a same-group document is not a negative
            logits.append(float(q[i] @ d[c]) / tau)
        target = float(q[i] @ d[pos]) / tau
        total += -(target - math.log(sum(math.exp(x) for x in logits)))
    return total / q.shape[0]


@pytest.mark.parametrize("in_batch", [True, False])
def test_loss_matches_reference(in_batch):
    g = torch.Generator().manual_seed(0)
    B, K, D = 5, 2, 8
    q, d = torch.randn(B, D, generator=g), torch.randn(B * (1 + K), D, generator=g)
    got = compute_loss_from_embeddings(q, d, K, temperature=0.1, in_batch_negatives=in_batch)
    assert float(got) == pytest.approx(_reference(q, d, K, 0.1, in_batch), rel=1e-5)


def test_same_group_in_batch_documents_are_masked():
    g = torch.Generator().manual_seed(1)
    B, K, D = 4, 1, 8
    q, d = torch.randn(B, D, generator=g), torch.randn(B * (1 + K), D, generator=g)
    qg = torch.tensor([0, 1, 0, 2])  # queries 0 and 2 share a group
    dg = torch.tensor([0, 10, 1, 11, 0, 12, 2, 1])  # last negative is group 1 (query 1's)
    got = compute_loss_from_embeddings(q, d, K, 0.05, True, qg, dg)
    assert float(got) == pytest.approx(_reference(q, d, K, 0.05, True, qg, dg), rel=1e-5)
    assert abs(float(got) - _reference(q, d, K, 0.05, True)) > 1e-5  # the mask changed something


def test_distillation_term_is_zero_when_student_equals_teacher():
    q = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    own = torch.einsum("bd,bkd->bk", q, d.view(3, 2, 4)) / 0.05
    plain = compute_loss_from_embeddings(q, d, 1, 0.05, False)
    distilled = compute_loss_from_embeddings(q, d, 1, 0.05, False, teacher_scores=own, distill_weight=1.0)
    assert float(distilled) == pytest.approx(float(plain), abs=1e-5)


class _Tiny(torch.nn.Module):
    """Embedding bag + dropout: the dropout makes RNG replay necessary."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, ids, mask, pool):
        h = self.drop(self.proj(self.emb(ids)))  # (B, T, 16)
        m = pool.float().unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1)


def _encoded(n: int, t: int, seed: int) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, t), generator=g)
    lens = torch.randint(2, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lens[:, None]).long()
    return Encoded(ids * mask, mask, mask.clone())


def _grad_pair(in_batch: bool, dropout: bool, chunked_reference: bool):
    K, B, chunk = 2, 6, 4
    queries, docs = _encoded(B, 7, 1), _encoded(B * (1 + K), 9, 2)
    qg, dg = torch.arange(B), torch.arange(100, 100 + B * (1 + K))
    dg[:: 1 + K] = qg

    def fn(q, d):
        return compute_loss_from_embeddings(q, d, K, 0.05, in_batch, qg, dg)

    plain_model = _Tiny().train(dropout)
    cached_model = copy.deepcopy(plain_model)

    def embed_plain(e: Encoded) -> torch.Tensor:
        if not chunked_reference:
            return plain_model(e.input_ids, e.attention_mask, e.pool_mask)
        # Same chunks as GradCache, so dropout draws the same masks in the same order.
        parts = [e.slice(lo, min(lo + chunk, len(e))) for lo in range(0, len(e), chunk)]
        return torch.cat([plain_model(p.input_ids, p.attention_mask, p.pool_mask) for p in parts])

    torch.manual_seed(123)
    loss_plain = fn(embed_plain(queries), embed_plain(docs))
    loss_plain.backward()
    torch.manual_seed(123)
    loss_cached = cached_backward(lambda e: cached_model(e.input_ids, e.attention_mask, e.pool_mask),
                                  [queries, docs], fn, chunk_size=chunk)
    assert float(loss_cached) == pytest.approx(float(loss_plain.detach()), rel=1e-6)
    for (name, a), (_, b) in zip(plain_model.named_parameters(), cached_model.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")


@pytest.mark.parametrize("in_batch", [True, False])
def test_gradcache_has_the_plain_loss_gradients(in_batch):
    """Deterministic model: the cached loss equals the plain one-pass loss, gradients included."""
    _grad_pair(in_batch, dropout=False, chunked_reference=False)


def test_gradcache_replays_dropout():
    """With dropout, the second pass replays each chunk's RNG state: identical masks, identical gradients."""
    _grad_pair(True, dropout=True, chunked_reference=True)


def test_module_form_runs_on_a_model(tiny_model):
    K = 1
    loss_mod = InfoNCELoss(tiny_model.train(), temperature=0.05)

    class Batch:
        queries, docs = _encoded(3, 5, 3), _encoded(6, 6, 4)
        num_negatives, query_groups, doc_groups, teacher_scores = K, None, None, None

    loss = loss_mod(Batch)
    loss.backward()
    assert torch.isfinite(loss) and tiny_model.head.latents.grad is not None
