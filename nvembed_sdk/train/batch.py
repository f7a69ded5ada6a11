"""Collation: a (micro-)batch of examples -> token tensors and the group ids the loss masks with.

The collator gives every document of the batch a group id (a negative that is another
example's positive takes that example's group) so the loss can mask same-group in-batch
columns. Instructions follow the text pipeline the Embedder uses: ``Instruct: {task}\\nQuery: ``
on the query only for retrieval, on both sides for symmetric tasks (classification,
clustering, STS), and always excluded from pooling through ``pool_starts``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nvembed_sdk.errors import InputError, fmt
from nvembed_sdk.text import TextPipeline
from nvembed_sdk.train.readers import Example

if TYPE_CHECKING:  # collate fills negatives through the stream it is given
    from nvembed_sdk.train.data import TrainData


@dataclass
class Encoded:
    """Token tensors of one side, (N, T) int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pool_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Encoded:
        return Encoded(self.input_ids.to(device), self.attention_mask.to(device), self.pool_mask.to(device))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def slice(self, lo: int, hi: int) -> Encoded:
        # Trim the padding the slice does not need, so a chunk costs what its longest row costs.
        t = int(self.attention_mask[lo:hi].sum(1).max()) if hi > lo else 0
        return Encoded(self.input_ids[lo:hi, :t], self.attention_mask[lo:hi, :t], self.pool_mask[lo:hi, :t])


@dataclass
class TrainBatch:
    """One (micro-)batch as the loss sees it.

    Attributes:
        queries: the local queries, (b, Tq).
        docs: the local documents, (b * (1 + K), Td), laid out [pos_0, neg_0_1..neg_0_K, pos_1, ...].
        query_groups: (B,) group ids of the *global* batch's queries (B = b * world size).
        doc_groups: (B * (1 + K),) group ids of the global batch's documents.
        teacher_scores: (B, 1 + K) teacher scores of the global batch's examples, or None.
        num_negatives: K.
    """

    queries: Encoded
    docs: Encoded
    query_groups: torch.Tensor
    doc_groups: torch.Tensor
    teacher_scores: torch.Tensor | None
    num_negatives: int
    extras: dict[str, Any] = field(default_factory=dict)

def encode_side(text: TextPipeline, texts: Sequence[str], prefixes: Sequence[str], max_length: int) -> Encoded:
    """Tokenise rows with per-row instruction prefixes and collate them (pool starts per row)."""
    ids: list[list[int]] = [[] for _ in texts]
    starts = [0] * len(texts)
    by_prefix: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prefixes):
        by_prefix[p].append(i)
    for prefix, rows in by_prefix.items():
        toks = text.tokenize([texts[i] for i in rows], prefix, max_length)
        L = text.instruction_length(prefix)
        for i, t in zip(rows, toks, strict=True):
            ids[i] = t
            starts[i] = L
    b = text.collate(ids, starts)
    return Encoded(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask), torch.from_numpy(b.pool_mask))


def collate(examples: Sequence[Example], data: TrainData, text: TextPipeline, rng: np.random.Generator,
            query_max_length: int, doc_max_length: int, rank: int = 0, world: int = 1) -> TrainBatch:
    """Build the global batch's group ids and this rank's token tensors.

    Args:
        examples: the global (micro-)batch; rank ``r`` embeds the contiguous shard ``r``.
        data: the stream (for negative filling).
        text: the text pipeline.
        rng: draws random negatives (seeded per batch, so every rank draws the same).
        query_max_length: query truncation.
        doc_max_length: document truncation.
        rank: this process's rank. Defaults to 0.
        world: number of processes. Defaults to 1.
    """
    K = data.num_negatives
    filled = [data.fill_negatives(e, rng) for e in examples]
    group_id: dict[str, int] = {}

    def gid(name: str) -> int:
        return group_id.setdefault(name, len(group_id))

    q_groups = [gid(e.group) for e in examples]
    positive_group = {e.positive: q_groups[i] for i, e in enumerate(examples)}
    d_groups: list[int] = []
    for i, (negs, ngroups) in enumerate(filled):
        d_groups.append(q_groups[i])
        for n, g in zip(negs, ngroups, strict=True):
            # A negative that is another example's positive belongs to that example's group;
            # an unknown group gets a fresh id (never masked).
            if n in positive_group:
                d_groups.append(positive_group[n])
            else:
                d_groups.append(gid(g) if g else gid(f"__unique_{i}_{len(d_groups)}"))
    B = len(examples)
    if B % world:
        raise InputError(fmt("batch", f"{B} examples on {world} ranks", "a batch size divisible by the world size"))
    lo, hi = rank * B // world, (rank + 1) * B // world
    local = examples[lo:hi]
    queries = encode_side(text, [e.query for e in local], [e.query_prefix for e in local], query_max_length)
    doc_texts, doc_prefixes = [], []
    for e, (negs, _) in zip(local, filled[lo:hi], strict=True):
        doc_texts += [e.positive, *negs]
        doc_prefixes += [e.doc_prefix] * (1 + K)
    docs = encode_side(text, doc_texts, doc_prefixes, doc_max_length)
    teacher = None  # (B, 1 + K) for the global batch: the loss is computed on gathered embeddings
    if examples and all(len(e.teacher_scores) >= 1 + K for e in examples):
        teacher = torch.tensor([list(e.teacher_scores[: 1 + K]) for e in examples], dtype=torch.float32)
    # The global batch's raw texts (queries without instruction), for teacher-embedding targets.
    extras = {"query_texts": [e.query for e in examples],
              "doc_texts": [t for e, (negs, _) in zip(examples, filled, strict=True) for t in (e.positive, *negs)]}
    return TrainBatch(queries, docs, torch.tensor(q_groups), torch.tensor(d_groups), teacher, K, extras)


__all__ = ["Encoded", "TrainBatch", "collate", "encode_side"]
