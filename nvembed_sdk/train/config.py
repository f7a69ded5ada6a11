"""``TrainConfig``: one frozen dataclass per training stage, read from a JSON, YAML or TOML file.

A stage file names where the weights come from (``init``), the data sources, the loss settings
and the schedule. Every field has a default except ``output_dir``; unknown keys are errors, so a
typo never silently falls back to a default (nanoGPT's ``configurator.py`` warning, taken to
heart: config is data, never exec'd code).

Example (JSON)::

    {
      "output_dir": "runs/small/stage1",
      "init": "scratch",
      "model": {"preset": "tiny-test", "hidden_size": 256, "num_hidden_layers": 4},
      "tokenizer": "runs/small/tokenizer",
      "data": [{"path": "runs/small/mined/debian-packages.jsonl.gz", "max_examples": 40000}],
      "batch_size": 64, "num_negatives": 3, "lr": 1e-3, "max_steps": 1000
    }
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvembed_sdk.errors import ArtifactError, InputError, fmt
from nvembed_sdk.train.settings import (
    DATA_FORMATS,
    INIT_KINDS,
    LEGACY_DISTILL_KEYS,
    SCHEDULES,
    SYMMETRIC_TASKS,
    TASKS,
    DataSource,
    DistillSettings,
    EvalSettings,
    LoRASettings,
)
from nvembed_sdk.validate import check_device, check_fields, check_range


@dataclass(frozen=True)
class TrainConfig:
    """One training stage.

    Attributes:
        output_dir: where checkpoints (``checkpoints/step-NNNNNN``), the final model
            (``final/``) and ``metrics.jsonl`` go.
        init: ``scratch`` (fresh weights from ``model``), ``nvembed`` (a released-layout
            checkpoint at ``init_path``) or ``mistral`` (a Mistral causal-LM checkpoint at
            ``init_path``: ``model.*`` keys become the decoder, the latent head is fresh).
            Defaults to ``scratch``.
        init_path: checkpoint directory for ``nvembed`` / ``mistral``. Defaults to None.
        model: for ``scratch``: ``{"preset": NAME, **DecoderConfig fields, "latent": {...}}``;
            for ``mistral``: ``{"latent": {...}}`` overrides of the fresh latent head.
            Defaults to {} (preset ``tiny-test``).
        tokenizer: directory holding ``tokenizer.json``. Defaults to ``init_path``.
        data: the training files, blended into one stream.
        num_negatives: hard negatives per query (mined ones first, then random fill).
            Defaults to 3.
        in_batch_negatives: score each query against every document of the (global) batch.
            Defaults to True (stage 1); stage 2 turns it off.
        temperature: softmax temperature tau; logits are cosine / tau. Defaults to 0.05.
        distill: teacher distillation settings (:class:`DistillSettings`: ``teacher``,
            ``cache``, ``teacher_max_length``, ``embedding_weight``, ``texts``,
            ``texts_per_step``, ``init_token_embeddings``, ``score_weight``,
            ``score_temperature``). The flat keys of older stage files (``teacher``,
            ``embed_distill_weight``, ``distill_texts``, ... see ``LEGACY_DISTILL_KEYS``) are
            still read into it. Defaults to no distillation.
        batch_size: examples per optimiser step, over all ranks. Defaults to 64.
        grad_accum_steps: micro-batches per step (each with its own in-batch negatives; the
            loss is divided). Defaults to 1.
        gradcache_chunk: embed in chunks of this many texts with GradCache (large batches in
            small memory, same gradients). Defaults to 0 (off).
        query_max_length: truncation of queries, instruction included. Defaults to 64.
        doc_max_length: truncation of documents. Defaults to 256.
        lr: peak learning rate. Defaults to 2e-5.
        min_lr_ratio: final lr / peak lr of the decay. Defaults to 0.0.
        weight_decay: AdamW weight decay (matrices only). Defaults to 0.03.
        betas: AdamW betas. Defaults to (0.9, 0.999).
        warmup_steps: linear warm-up. Defaults to 100.
        schedule: ``linear``, ``cosine`` or ``constant`` after warm-up. Defaults to linear.
        max_steps: optimiser steps. Defaults to 1000.
        max_minutes: stop (with a checkpoint) after this wall time; the schedule still
            follows ``max_steps``. Defaults to None.
        grad_clip: global norm clip. Defaults to 1.0 (0 disables).
        lora: LoRA settings.
        eval: dev evaluation settings.
        checkpoint_every_steps: write a checkpoint every N steps. Defaults to 500.
        checkpoint_every_minutes: also write one when this much time passed. Defaults to None.
        keep_checkpoints: how many step checkpoints to keep. Defaults to 2.
        log_every_steps: log line interval. Defaults to 10.
        seed: everything random derives from it. Defaults to 0.
        num_threads: torch CPU threads. Defaults to None (torch's default).
        device: ``auto``, ``cpu``, ``cuda``. Defaults to auto.
        bf16: bf16 autocast on CUDA. Defaults to True (ignored on CPU).
        save_dtype: dtype of the final checkpoint. Defaults to float32.
        max_length: ``max_length`` recorded in the saved config. Defaults to None (keep).
        distributed: multi-rank strategy under torchrun: ``ddp`` (replicas, gradients summed) or
            ``fsdp`` (FSDP2 shards weights, gradients and optimiser state; full fine-tuning of
            models whose replicas do not fit, ``nvembed_sdk.train.fsdp``). Defaults to ddp.
    """

    output_dir: str
    init: str = "scratch"
    init_path: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    data: tuple[DataSource, ...] = ()
    num_negatives: int = 3
    in_batch_negatives: bool = True
    temperature: float = 0.05
    distill: DistillSettings = field(default_factory=DistillSettings)
    batch_size: int = 64
    grad_accum_steps: int = 1
    gradcache_chunk: int = 0
    query_max_length: int = 64
    doc_max_length: int = 256
    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    schedule: str = "linear"
    max_steps: int = 1000
    max_minutes: float | None = None
    grad_clip: float = 1.0
    lora: LoRASettings = field(default_factory=LoRASettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint_every_steps: int = 500
    checkpoint_every_minutes: float | None = None
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    seed: int = 0
    num_threads: int | None = None
    device: str = "auto"
    bf16: bool = True
    save_dtype: str = "float32"
    max_length: int | None = None
    distributed: str = "ddp"

    def __post_init__(self) -> None:
        check_fields(self, "train config ")
        # Ranges, each naming its field. A huge lr is allowed (the non-finite loss guard of the
        # loop stops such a run at its first bad step); a negative or zero one is not.
        positive = ("lr", "temperature", "max_minutes", "checkpoint_every_minutes")
        at_least_one = ("batch_size", "grad_accum_steps", "max_steps", "checkpoint_every_steps", "keep_checkpoints",
                        "log_every_steps", "num_threads", "query_max_length", "doc_max_length", "max_length")
        non_negative = ("num_negatives", "gradcache_chunk", "weight_decay", "warmup_steps", "grad_clip")
        for name in positive + at_least_one + non_negative:
            value = getattr(self, name)
            if value is None:
                continue
            if name in positive:
                check_range(f"train config {name}", value, 0, lo_open=True)
            else:
                check_range(f"train config {name}", value, 1 if name in at_least_one else 0)
        check_range("train config min_lr_ratio", self.min_lr_ratio, 0, 1)
        for i, beta in enumerate(self.betas):
            check_range(f"train config betas[{i}]", beta, 0, 1)
        check_device(None if self.device == "auto" else self.device)
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise InputError(fmt("train config save_dtype", repr(self.save_dtype), "float32, float16 or bfloat16"))
        ds = self.distill
        checks = [
            (self.init in INIT_KINDS, "init", repr(self.init), f"one of {INIT_KINDS}"),
            (self.init == "scratch" or self.init_path, "init_path", None, f"a checkpoint directory for init {self.init!r}"),
            (self.init != "scratch" or self.tokenizer, "tokenizer", None,
             "a tokenizer directory (train one with `nvembed tokenizer train`) for init 'scratch'"),
            (self.schedule in SCHEDULES, "schedule", repr(self.schedule), f"one of {SCHEDULES}"),
            (self.temperature > 0, "temperature", self.temperature, "must be > 0"),
            (self.num_negatives >= 0, "num_negatives", self.num_negatives, "must be >= 0"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1"),
            (self.grad_accum_steps >= 1 and self.batch_size % self.grad_accum_steps == 0, "grad_accum_steps",
             self.grad_accum_steps, f"must be >= 1 and divide batch_size ({self.batch_size})"),
            (self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1"),
            (len(self.data) > 0, "data", "no sources", "at least one {\"path\": ...} entry"),
            (ds.teacher or not (ds.embedding_weight > 0 or ds.init_token_embeddings or ds.relation_weight > 0),
             "distill.teacher", None,
             "a teacher ('minilm' or an encoder directory) for distill.embedding_weight / relation_weight / "
             "init_token_embeddings"),
            (not ds.init_token_embeddings or self.init == "scratch", "distill.init_token_embeddings", True,
             "only with init 'scratch'"),
            (not ds.texts or (ds.teacher and ds.embedding_weight > 0), "distill.texts", list(ds.texts),
             "a teacher and distill.embedding_weight > 0 (distill_texts only feed that term)"),
            (not ds.texts or not self.gradcache_chunk, "distill.texts", list(ds.texts),
             "not combined with gradcache_chunk"),
            (self.distributed in ("ddp", "fsdp"), "distributed", repr(self.distributed), "'ddp' or 'fsdp'"),
        ]
        for ok, name, got, expected in checks:
            if not ok:
                raise InputError(fmt(f"train config {name}", got, expected))

    @property
    def tokenizer_dir(self) -> str:
        return str(self.tokenizer or self.init_path)

    @property
    def teacher_cache_dir(self) -> str:
        return self.distill.cache or str(Path(self.output_dir) / "teacher-cache")

    # ---- I/O --------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: str | Path | None = None) -> TrainConfig:
        """Build from a plain dict (as read from a file), rejecting unknown keys.

        Args:
            d: the settings.
            base_dir: unused; paths are taken relative to the working directory, as the CLI runs.
                Defaults to None.

        Raises:
            InputError: unknown keys or bad values.
        """
        if not isinstance(d, dict):
            raise InputError(fmt("train config", type(d).__name__, "a mapping of settings"))
        d = dict(d)
        _reject_unknown("train config", d, cls, extra=tuple(LEGACY_DISTILL_KEYS))
        if "data" in d:
            items = d["data"] if isinstance(d["data"], list) else [d["data"]]
            sources = []
            for item in items:
                item = {"path": item} if isinstance(item, str) else _mapping("train config data[]", item)
                _reject_unknown("train config data[]", item, DataSource)
                sources.append(DataSource(**item))
            d["data"] = tuple(sources)
        if "lora" in d:
            lo = _mapping("train config lora", d["lora"])
            _reject_unknown("train config lora", lo, LoRASettings)
            if isinstance(lo.get("target_modules"), list):
                lo["target_modules"] = tuple(lo["target_modules"])
            d["lora"] = LoRASettings(**lo)
        if "eval" in d:
            ev = _mapping("train config eval", d["eval"])
            _reject_unknown("train config eval", ev, EvalSettings)
            d["eval"] = EvalSettings(**ev)
        if "betas" in d and isinstance(d["betas"], list):
            d["betas"] = tuple(d["betas"])
        legacy = {k: d.pop(k) for k in list(d) if k in LEGACY_DISTILL_KEYS}
        if "distill" in d or legacy:
            ds = _mapping("train config distill", d.get("distill", {}))
            _reject_unknown("train config distill", ds, DistillSettings)
            for old, value in legacy.items():
                new = LEGACY_DISTILL_KEYS[old]
                if new in ds and ds[new] != value:
                    raise InputError(fmt(f"train config {old}", repr(value),
                                         f"one setting: the flat key or distill.{new} ({ds[new]!r}), not both"))
                ds[new] = value
            if isinstance(ds.get("texts"), (str, list)):
                ds["texts"] = (ds["texts"],) if isinstance(ds["texts"], str) else tuple(ds["texts"])
            d["distill"] = DistillSettings(**ds)
        try:
            return cls(**d)
        except InputError:
            raise
        except TypeError as exc:
            raise InputError(fmt("train config", str(exc), "see `nvembed train --help` for the fields")) from exc

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a ``.json``, ``.yaml``/``.yml`` or ``.toml`` stage file.

        Args:
            path: the file.
            overrides: top-level keys replacing the file's. Defaults to None.

        Raises:
            ArtifactError: missing or unreadable file.
            InputError: bad settings.
        """
        p = Path(path)
        if not p.is_file():
            raise ArtifactError(fmt("train config", f"no file at {p}", "a .json, .yaml or .toml stage file"))
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:  # was a one-line error that did not name the file
            raise ArtifactError(fmt(str(p), f"bytes that are not UTF-8 ({exc.reason} at byte {exc.start})",
                                    "a UTF-8 JSON, YAML or TOML stage file")) from None
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            elif p.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # json/yaml/toml each raise their own error type
            raise ArtifactError(fmt(str(p), f"unreadable ({exc})", "valid JSON, YAML or TOML")) from exc
        if not isinstance(data, dict | None):  # a JSON list or a YAML string: {**data} raised TypeError
            raise ArtifactError(fmt(str(p), f"a {type(data).__name__}", "a mapping of settings, e.g. {\"output_dir\": ...}"))
        data = {**(data or {}), **(overrides or {})}
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"] = [dict(s) for s in d["data"]]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(fmt(where, f"{value!r:.60} ({type(value).__name__})", "a mapping of settings"))
    return dict(value)


def _reject_unknown(where: str, d: dict[str, Any], cls: type, extra: tuple[str, ...] = ()) -> None:
    known = {f.name for f in dataclasses.fields(cls)} | set(extra)
    unknown = sorted(set(d) - known)
    if unknown:
        raise InputError(fmt(where, f"unknown keys {unknown}", f"valid keys: {sorted(known)}"))


__all__ = ["DATA_FORMATS", "INIT_KINDS", "LEGACY_DISTILL_KEYS", "SCHEDULES", "SYMMETRIC_TASKS", "TASKS", "DataSource",
           "DistillSettings", "EvalSettings", "LoRASettings", "TrainConfig"]
