"""InfoNCE maths against a reference written out in the test, and GradCache's gradient equality."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from nvembed_sdk.train.data import Encoded
from nvembed_sdk.train.gradcache import cached_backward
from nvembed_sdk.train.losses import (
    InfoNCELoss,
    StageLoss,
    compute_loss_from_embeddings,
    info_nce_logits,
    relation_distill_loss,
)


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


def _relation_reference(logits, tq, fq, td, fd, tau):
    """Loop form of the relation term: per usable query, KL over the columns both sides have."""
    total, rows = 0.0, 0
    for i in range(logits.shape[0]):
        cols = [c for c in range(logits.shape[1]) if math.isfinite(float(logits[i, c])) and bool(fd[c])]
        if not bool(fq[i]) or len(cols) < 2:
            continue
        s = [float(logits[i, c]) for c in cols]
        t = [float(tq[i] @ td[c]) / tau for c in cols]
        ls = [x - math.log(sum(math.exp(y) for y in s)) for x in s]
        lt = [x - math.log(sum(math.exp(y) for y in t)) for x in t]
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls, strict=True))
        rows += 1
    return total / rows


def test_relation_term_matches_reference_with_masks_and_missing_rows():
    g = torch.Generator().manual_seed(2)
    B, K, D, Dt = 4, 1, 8, 6
    q, d = torch.randn(B, D, generator=g), torch.randn(B * (1 + K), D, generator=g)
    qg, dg = torch.tensor([0, 1, 0, 2]), torch.tensor([0, 10, 1, 11, 0, 12, 2, 1])  # same-group columns -> -inf
    scores = info_nce_logits(q, d, K, temperature=0.1, query_groups=qg, doc_groups=dg)
    assert not bool(torch.isfinite(scores.logits).all())
    tq = torch.nn.functional.normalize(torch.randn(B, Dt, generator=g), dim=-1)
    td = torch.nn.functional.normalize(torch.randn(B * (1 + K), Dt, generator=g), dim=-1)
    fq = torch.tensor([True, True, False, True])  # query 2 has no teacher row: its row drops out
    fd = torch.tensor([True, True, True, False, True, True, True, True])  # column 3 drops out of every row
    got = relation_distill_loss(scores.logits, tq, fq, td, fd, temperature=0.1)
    assert float(got) == pytest.approx(_relation_reference(scores.logits, tq, fq, td, fd, 0.1), rel=1e-5)
    td_changed = td.clone()
    td_changed[3] = -td_changed[3]  # a missing teacher row's content must not matter
    assert float(relation_distill_loss(scores.logits, tq, fq, td_changed, fd, temperature=0.1)) == pytest.approx(
        float(got), rel=1e-6)


@pytest.mark.parametrize("in_batch", [True, False])
def test_relation_term_is_zero_on_the_teachers_structure_and_its_gradient_moves_towards_it(in_batch):
    g = torch.Generator().manual_seed(3)
    B, K, D = 6, 2, 8
    tq = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    td = torch.nn.functional.normalize(torch.randn(B * (1 + K), D, generator=g), dim=-1)
    found_q, found_d = torch.ones(B, dtype=torch.bool), torch.ones(B * (1 + K), dtype=torch.bool)
    same = info_nce_logits(tq, td, K, temperature=0.05, in_batch_negatives=in_batch).logits
    assert float(relation_distill_loss(same, tq, found_q, td, found_d, temperature=0.05)) == pytest.approx(0, abs=1e-5)
    # A student elsewhere: positive loss, and a gradient step lowers it without NaN.
    q = torch.randn(B, D, generator=g, requires_grad=True)
    d = torch.randn(B * (1 + K), D, generator=g, requires_grad=True)

    def loss():
        logits = info_nce_logits(q, d, K, temperature=0.05, in_batch_negatives=in_batch).logits
        return relation_distill_loss(logits, tq, found_q, td, found_d, temperature=0.05)

    before = loss()
    assert float(before.detach()) > 0.1
    before.backward()
    assert bool(torch.isfinite(q.grad).all() and torch.isfinite(d.grad).all())
    with torch.no_grad():
        q -= 0.05 * q.grad / q.grad.norm()
        d -= 0.05 * d.grad / d.grad.norm()
    assert float(loss().detach()) < float(before.detach())


def test_stage_loss_adds_the_weighted_relation_term():
    g = torch.Generator().manual_seed(4)
    B, K, D = 4, 1, 8
    q, d = torch.randn(B, D, generator=g), torch.randn(B * (1 + K), D, generator=g)
    rows = (torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1), torch.ones(B, dtype=torch.bool),
            torch.nn.functional.normalize(torch.randn(B * (1 + K), D, generator=g), dim=-1),
            torch.ones(B * (1 + K), dtype=torch.bool))

    class Batch:
        num_negatives, query_groups, doc_groups, teacher_scores = K, None, None, None

    plain = StageLoss(temperature=0.05, in_batch_negatives=True)(q, d, Batch(), teacher_rows=rows)
    off = StageLoss(temperature=0.05, in_batch_negatives=True, relation_weight=0.0)(q, d, Batch(), teacher_rows=rows)
    on = StageLoss(temperature=0.05, in_batch_negatives=True, relation_weight=2.0)(q, d, Batch(), teacher_rows=rows)
    term = relation_distill_loss(info_nce_logits(q, d, K, temperature=0.05).logits, *rows, temperature=0.05)
    assert float(off) == pytest.approx(float(plain))
    assert float(on) == pytest.approx(float(plain) + 2.0 * float(term), rel=1e-5)
