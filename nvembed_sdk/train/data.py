"""The blended training stream: all sources of a stage, deterministic batches per (seed, epoch).

Rules that keep false negatives out of the loss: a batch never holds two examples of one
group, one query text or one positive text (:func:`pack_batches`); random negatives never come
from the example's group (:meth:`TrainData.fill_negatives`); the collator
(:mod:`nvembed_sdk.train.batch`) then gives every document a group id the loss masks with.

The readers live in :mod:`nvembed_sdk.train.readers` and the collator in
:mod:`nvembed_sdk.train.batch`; their public names are re-exported here, the one import a
script needs for the training data.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from nvembed_sdk.errors import ArtifactError, fmt
from nvembed_sdk.train.batch import Encoded, TrainBatch, collate, encode_side
from nvembed_sdk.train.readers import (
    Example,
    build_section_pairs,
    check_training_path,
    held_out_roots,
    is_held_out_source,
    norm_text,
    read_debian_packages,
    read_distill_texts,
    read_generic,
    read_jsonl,
    read_section_records,
    read_wordnet,
    texts_for_tokenizer,
    write_jsonl,
)
from nvembed_sdk.train.settings import DataSource


class TrainData:
    """All sources of a stage, blended; deterministic batches per (seed, epoch).

    Args:
        sources: the stage's data sources.
        num_negatives: hard negatives per example (missing ones filled with random texts).
        seed: the stage seed.
    """

    def __init__(self, sources: Sequence[DataSource], num_negatives: int, seed: int) -> None:
        self.sources = list(sources)
        self.num_negatives = num_negatives
        self.seed = seed
        self._fixed: dict[int, list[Example]] = {}
        self._sections: dict[int, list[dict[str, Any]]] = {}
        for i, s in enumerate(self.sources):
            fmt_ = s.resolved_format
            if fmt_ == "debian-sections":
                self._sections[i] = read_section_records(s.path)
            elif fmt_ == "debian-packages":
                self._fixed[i] = read_debian_packages(s.path, s.instruction, source=i)
            elif fmt_ == "wordnet":
                self._fixed[i] = read_wordnet(s.path, s.instruction, source=i)
            else:
                self._fixed[i] = read_generic(s.path, s.task, s.instruction, source=i)
            if i in self._fixed and not self._fixed[i]:
                raise ArtifactError(fmt("training data", f"{s.path} has no records", "a non-empty file"))
        # Random-negative pools: every positive of a source, with its group.
        self._pools: dict[int, tuple[list[str], list[str]]] = {}
        for i, exs in self._fixed.items():
            self._pools[i] = ([e.positive for e in exs], [e.group for e in exs])
        for i, recs in self._sections.items():
            self._pools[i] = ([r["text"] for r in recs], ["label:" + r["label"] for r in recs])
        self._epoch_cache: tuple[int, list[Example], list[list[int]], int] | None = None

    def pair_texts(self, with_negatives: bool = False) -> list[str]:
        """Every query and positive of the pair sources (not section texts), in file order, and
        with ``with_negatives`` each example's hard negatives after its positive."""
        return [t for exs in self._fixed.values() for e in exs
                for t in ((e.query, e.positive, *e.negatives) if with_negatives else (e.query, e.positive))]

    def epoch_examples(self, epoch: int) -> list[Example]:
        """The examples of one epoch: seeded subsets of each source, shuffled together."""
        rng = random.Random(self.seed * 1_000_003 + epoch)  # not hash(): str hashing is salted per process
        out: list[Example] = []
        for i, s in enumerate(self.sources):
            if i in self._sections:
                n = s.max_examples or len(self._sections[i])
                out += build_section_pairs(self._sections[i], n, s.task or "classification", self.num_negatives,
                                           seed=rng.randrange(2**31), instruction=s.instruction, source=i)
            else:
                exs = self._fixed[i]
                if s.max_examples and s.max_examples < len(exs):
                    exs = [exs[j] for j in sorted(rng.sample(range(len(exs)), s.max_examples))]
                out += exs
        rng.shuffle(out)
        return out

    def epoch_batches(self, epoch: int, batch_size: int) -> tuple[list[Example], list[list[int]]]:
        """Examples and batches (index lists) of an epoch; no group, query or positive twice per batch."""
        if self._epoch_cache and self._epoch_cache[0] == epoch and self._epoch_cache[3] == batch_size:
            return self._epoch_cache[1], self._epoch_cache[2]
        examples = self.epoch_examples(epoch)
        batches = pack_batches(examples, batch_size)
        self._epoch_cache = (epoch, examples, batches, batch_size)
        return examples, batches

    def fill_negatives(self, ex: Example, rng: np.random.Generator) -> tuple[list[str], list[str]]:
        """Exactly ``num_negatives`` negatives and their groups: the example's own first, then random
        texts of the same source (never of the example's group, never the positive)."""
        k = self.num_negatives
        negs = list(ex.negatives[:k])
        groups = list(ex.negative_groups[:k]) + [""] * max(0, min(k, len(ex.negatives)) - len(ex.negative_groups))
        texts, pool_groups = self._pools[ex.source]
        tries = 0
        while len(negs) < k and tries < 50 * k:
            tries += 1
            j = int(rng.integers(len(texts)))
            if pool_groups[j] == ex.group or texts[j] == ex.positive or texts[j] in negs:
                continue
            negs.append(texts[j])
            groups.append(pool_groups[j])
        while len(negs) < k:  # tiny pools only: repeat what we have rather than leak a positive
            negs.append(negs[len(negs) % max(1, len(negs))] if negs else texts[int(rng.integers(len(texts)))])
            groups.append(groups[-1] if groups else "")
        return negs, groups


def pack_batches(examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """Greedy packing in order: an example that clashes with the open batch (same group, same
    normalised query or positive) waits for a later batch. The last partial batch is dropped."""
    batches: list[list[int]] = []
    pending: list[int] = []
    order = list(range(len(examples)))
    keys = [(e.group, "q:" + norm_text(e.query), "p:" + norm_text(e.positive)) for e in examples]
    pos = 0
    while pos < len(order) or pending:
        batch: list[int] = []
        seen: set[str] = set()
        still: list[int] = []
        for i in pending:
            if len(batch) < batch_size and not seen.intersection(keys[i]):
                batch.append(i)
                seen.update(keys[i])
            else:
                still.append(i)
        while len(batch) < batch_size and pos < len(order):
            i = order[pos]
            pos += 1
            if seen.intersection(keys[i]):
                still.append(i)
            else:
                batch.append(i)
                seen.update(keys[i])
        pending = still
        if len(batch) < batch_size:
            break
        batches.append(batch)
        if len(pending) > 4 * batch_size and pos >= len(order):
            break  # the rest cannot form clash-free batches (few groups left)
    return batches


__all__ = ["Encoded", "Example", "TrainBatch", "TrainData", "build_section_pairs", "check_training_path", "collate",
           "encode_side", "held_out_roots", "is_held_out_source", "norm_text", "pack_batches", "read_debian_packages",
           "read_distill_texts", "read_generic", "read_jsonl", "read_section_records", "read_wordnet",
           "texts_for_tokenizer", "write_jsonl"]
