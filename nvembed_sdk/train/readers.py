"""Training data readers: every source file becomes a list of :class:`Example`.

An example is (query, positive, hard negatives, task text, task type, group). The **group**
names texts that must never be each other's negatives: the Debian ``source`` (siblings such
as ``-dev``/``-doc`` are near-duplicates), the WordNet ``synset``, the Debian ``section`` label
of an example-based pair (:func:`build_section_pairs`).

Never pass the shipped ``dev/`` or ``calibration/`` files: :func:`check_training_path` refuses
them (and byte-identical copies of them), and every reader goes through it.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvembed_sdk.embedder import query_instruction
from nvembed_sdk.errors import ArtifactError, InputError, fmt, writing
from nvembed_sdk.train.settings import SYMMETRIC_TASKS, TASKS

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

