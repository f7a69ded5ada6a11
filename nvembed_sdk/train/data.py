"""Training data: readers, the example-based pair builder, blended batches and collation.

Every source becomes a list of :class:`Example` (query, positive, hard negatives, task text,
task type, group). Rules that keep false negatives out of the loss live here:

* an example's **group** names texts that must never be each other's negatives: the Debian
  ``source`` (siblings such as ``-dev``/``-doc`` are near-duplicates), the WordNet ``synset``,
  the Debian ``section`` label of an example-based pair;
* a batch never holds two examples of one group, one query text or one positive text;
* the collator gives every document of the batch a group id (a negative that is another
  example's positive takes that example's group), and the loss masks same-group in-batch
  columns.

Instructions follow the text pipeline the Embedder uses: ``Instruct: {task}\\nQuery: `` on the
query only for retrieval, on both sides for symmetric tasks (classification, clustering, STS),
and always excluded from pooling through ``pool_starts``.

Never pass the shipped ``dev/`` or ``calibration/`` files: :func:`check_training_path` refuses them.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nvembed_sdk.embedder import query_instruction
from nvembed_sdk.errors import ArtifactError, InputError, fmt, writing
from nvembed_sdk.text import TextPipeline
from nvembed_sdk.train.config import SYMMETRIC_TASKS, TASKS, DataSource

WORDNET_TASKS = {
    "example_to_gloss": "Given a sentence, retrieve the dictionary definition of the sense of the word it uses",
    "lemma_to_gloss": "Given a word and its part of speech, retrieve its dictionary definition",
}
SECTION_TASKS = {
    "classification": "Classify a Debian package description into its archive section",
    "clustering": "Identify the topic or category of a software package from its description",
}
# The shipped held-out folders (../shared/data/{dev,calibration} beside the checkout), plus any
# listed in NVEMBED_HELD_OUT (os.pathsep-separated). Keyed to these folders, not to any folder
# that happens to be named dev/ or calibration/ in a user's project.
HELD_OUT_ENV = "NVEMBED_HELD_OUT"
_HELD_OUT_NAMES = ("dev", "calibration")


@functools.lru_cache(maxsize=8)
def _held_out_roots(env: str) -> tuple[Path, ...]:
    repo = Path(__file__).resolve().parents[2]  # nvembed_sdk/train/data.py -> the checkout
    candidates = [repo.parent / "shared" / "data" / n for n in _HELD_OUT_NAMES]
    candidates += [Path(p) for p in env.split(os.pathsep) if p]
    return tuple(c.resolve() for c in candidates if c.is_dir())


def held_out_roots() -> tuple[Path, ...]:
    """The held-out data folders that exist here (resolved)."""
    return _held_out_roots(os.environ.get(HELD_OUT_ENV, ""))


@functools.lru_cache(maxsize=8)
def _held_out_fingerprints(roots: tuple[Path, ...]) -> dict[int, list[Path]]:
    sizes: dict[int, list[Path]] = defaultdict(list)
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file():
                sizes[f.stat().st_size].append(f)
    return dict(sizes)


def is_held_out_source(source: str) -> bool:
    """The data README's split rule: a Debian source package is held out (dev) when
    ``sha256(source) % 10 == 0``."""
    return int(hashlib.sha256(source.encode("utf-8")).hexdigest(), 16) % 10 == 0


@dataclass(frozen=True)
class Example:
    """One training example.

    Attributes:
        query: query text (without instruction).
        positive: the relevant document.
        negatives: hard negatives, best (hardest) first.
        task: task type (``retrieval``, ``classification``, ``clustering``, ``sts``).
        instruction: task text; the prefix is ``Instruct: {instruction}\\nQuery: ``. Empty: none.
        group: texts of one group are never negatives of each other.
        negative_groups: the group of each negative when known (mined), else empty.
        teacher_scores: teacher scores of (positive, *negatives) when mined, else empty.
        source: index of the data source it came from (random negatives come from the same one).
    """

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    task: str = "retrieval"
    instruction: str = ""
    group: str = ""
    negative_groups: tuple[str, ...] = ()
    teacher_scores: tuple[float, ...] = ()
    source: int = 0

    @property
    def query_prefix(self) -> str:
        return query_instruction(self.instruction) if self.instruction else ""

    @property
    def doc_prefix(self) -> str:
        return self.query_prefix if self.task in SYMMETRIC_TASKS else ""


def norm_text(text: str) -> str:
    """Comparison form (data README): whitespace collapsed, lower-cased, trailing ``.`` removed."""
    return re.sub(r"\s+", " ", text).strip().lower().rstrip(".")


def check_training_path(path: str | Path) -> Path:
    """Refuse held-out data: a file under the shipped ``dev/`` or ``calibration/`` folders (see
    :func:`held_out_roots`) or a byte-identical copy of one."""
    p = Path(path)
    resolved = p.resolve()
    roots = held_out_roots()
    if any(resolved.is_relative_to(root) for root in roots):
        raise InputError(fmt("training data", str(p), "never train on the shipped dev/ or calibration/ files (held out)"))
    if not p.is_file():
        raise ArtifactError(fmt("training data", f"no file at {p}", "a .jsonl or .jsonl.gz file"))
    same_size = _held_out_fingerprints(roots).get(p.stat().st_size, []) if roots else []
    if same_size:
        from nvembed_sdk.manifest import sha256_file

        digest = sha256_file(p)
        for f in same_size:
            if sha256_file(f) == digest:
                raise InputError(fmt("training data", f"{p} (a copy of the held-out {f})",
                                     "never train on the shipped dev/ or calibration/ files (held out)"))
    return p


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a ``.jsonl`` or ``.jsonl.gz`` file (gzip detected from the magic bytes)."""
    p = Path(path)
    with open(p, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    with opener(p, "rb") as fh:
        for n, line in enumerate(io.TextIOWrapper(fh, encoding="utf-8"), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ArtifactError(fmt(f"{p}:{n}", f"invalid JSON ({exc.msg})", "one JSON object per line")) from exc


def write_jsonl(path: str | Path, records: Iterator[dict[str, Any]] | Sequence[dict[str, Any]]) -> int:
    """Write records (gzip when the name ends in ``.gz``, no timestamp: reproducible bytes)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    with writing(p, "records"):  # a full disk: one line naming the file, no half-written .tmp left
        try:
            with open(tmp, "wb") as raw:
                fh = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") if p.name.endswith(".gz") else raw
                for rec in records:
                    fh.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
                    n += 1
                if fh is not raw:
                    fh.close()
            tmp.replace(p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return n


# ---- readers -----------------------------------------------------------------------------------


def read_debian_packages(path: str | Path, instruction: str | None = None, source: int = 0) -> list[Example]:
    """``train/debian-packages``: summary -> long description, grouped by Debian source."""
    p = check_training_path(path)
    out = []
    for n, r in enumerate(read_jsonl(p), 1):
        if is_held_out_source(str(r["source"])):
            raise InputError(fmt(f"training data {p}:{n}", f"source package {r['source']!r}, reserved for dev",
                                 "never train on held-out Debian sources (data README split rule)"))
        out.append(Example(query=r["query"], positive=r["positive"], instruction=instruction or r.get("instruction", ""),
                           group="src:" + r["source"], source=source))
    return out


def read_wordnet(path: str | Path, instruction: str | None = None, source: int = 0) -> list[Example]:
    """``train/wordnet``: example sentence or lemma -> gloss; other senses are hard negatives."""
    out = []
    for r in read_jsonl(check_training_path(path)):
        kind = r.get("type", "lemma_to_gloss")
        out.append(Example(query=r["query"], positive=r["positive"],
                           negatives=tuple(r.get("other_sense_glosses") or ()),
                           instruction=instruction or WORDNET_TASKS[kind], group="syn:" + r["synset"], source=source))
    return out


def read_generic(path: str | Path, task: str | None = None, instruction: str | None = None,
                 source: int = 0) -> list[Example]:
    """Generic records ``{query, positive, negatives?, instruction?, task?, group?}``.

    ``nvembed mine`` adds ``negative_groups`` and ``teacher_scores`` (positive first).
    """
    p = check_training_path(path)
    out = []
    for n, r in enumerate(read_jsonl(p), 1):
        if "query" not in r or "positive" not in r:
            raise ArtifactError(fmt(f"{p}:{n}", f"keys {sorted(r)}", "'query' and 'positive' in every record"))
        t = r.get("task") or task or "retrieval"
        if t not in TASKS:
            raise ArtifactError(fmt(f"{p}:{n} task", repr(t), f"one of {TASKS}"))
        out.append(Example(
            query=r["query"], positive=r["positive"], negatives=tuple(r.get("negatives") or ()), task=t,
            instruction=instruction if instruction is not None else (r.get("instruction") or ""),
            group=str(r.get("group") or f"rec:{p.name}:{n}"),
            negative_groups=tuple(str(g) for g in r.get("negative_groups") or ()),
            teacher_scores=tuple(float(s) for s in r.get("teacher_scores") or ()), source=source))
    return out


def read_section_records(path: str | Path) -> list[dict[str, Any]]:
    return list(read_jsonl(check_training_path(path)))


def build_section_pairs(records: Sequence[dict[str, Any]], num_pairs: int, task: str, num_negatives: int,
                        seed: int, instruction: str | None = None, source: int = 0) -> list[Example]:
    """Example-based classification / clustering pairs from ``train/debian-sections``.

    Labels are drawn with probability proportional to sqrt(count) (the counts are strongly
    imbalanced: libs 5,422 down to shells 33), then a record of that label; the positive is
    another record of the same label from a *different* source, the negatives are records of
    other labels (one label each). The group is the label, so a batch holds one pair per label.

    Args:
        records: ``{"text", "label", "source"}`` dicts.
        num_pairs: pairs to build.
        task: ``classification`` or ``clustering``.
        num_negatives: other-label examples per pair.
        seed: seed of this draw.
        instruction: task text. Defaults to the built-in one for ``task``.
        source: source index stored on the examples.

    Returns:
        The pairs.
    """
    if task not in SECTION_TASKS:
        raise InputError(fmt("debian-sections task", repr(task), f"one of {sorted(SECTION_TASKS)}"))
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_label[r["label"]].append(i)
    labels = sorted(lab for lab, idx in by_label.items() if len({records[i]["source"] for i in idx}) >= 2)
    if len(labels) < 2:
        raise InputError(fmt("debian-sections", f"{len(labels)} usable labels", "at least 2 labels with 2+ sources"))
    weights = [len(by_label[lab]) ** 0.5 for lab in labels]
    text_task = instruction or SECTION_TASKS[task]
    out = []
    for label in rng.choices(labels, weights=weights, k=num_pairs):
        idx = by_label[label]
        a = records[rng.choice(idx)]
        while True:  # a label has >= 2 sources, so this ends
            b = records[rng.choice(idx)]
            if b["source"] != a["source"]:
                break
        other = rng.sample([lab for lab in labels if lab != label], k=min(num_negatives, len(labels) - 1))
        negs = [records[rng.choice(by_label[lab])] for lab in other]
        out.append(Example(query=a["text"], positive=b["text"], negatives=tuple(n["text"] for n in negs), task=task,
                           instruction=text_task, group="label:" + label,
                           negative_groups=tuple("label:" + lab for lab in other), source=source))
    return out


# ---- the blended stream ------------------------------------------------------------------------


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

    def pair_texts(self) -> list[str]:
        """Every query and positive of the pair sources (not section texts), in file order."""
        return [t for exs in self._fixed.values() for e in exs for t in (e.query, e.positive)]

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


# ---- collation --------------------------------------------------------------------------------


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


def read_distill_texts(paths: Sequence[str | Path]) -> list[str]:
    """Unique texts of distillation-only files (``{"text": ...}`` per line), in file order.

    Raises:
        InputError: a held-out path, or a record without a non-empty string ``text``.
    """
    out: dict[str, None] = {}
    for path in paths:
        p = check_training_path(path)
        for i, rec in enumerate(read_jsonl(p)):
            t = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(t, str) or not t.strip():
                raise InputError(fmt(f"distillation text {p} line {i + 1}", repr(rec)[:80],
                                     'a JSON object with a non-empty string "text"'))
            out.setdefault(t, None)
    return list(out)


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


def texts_for_tokenizer(paths: Sequence[str | Path]) -> Iterator[str]:
    """Every text of the training files (queries, positives, negatives, section texts)."""
    for path in paths:
        for r in read_jsonl(check_training_path(path)):
            for key in ("query", "positive", "text"):
                if isinstance(r.get(key), str):
                    yield r[key]
            for key in ("negatives", "other_sense_glosses"):
                for t in r.get(key) or ():
                    if isinstance(t, str):
                        yield t
