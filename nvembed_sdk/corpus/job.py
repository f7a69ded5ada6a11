"""A corpus embedding job: its settings, its two stages, and the in-process run.

Stage 1 (CPU): read a part, tokenise it with the artifact's :class:`TextPipeline` (the one
implementation of the instruction/EOS/truncation and pool-mask rules), sort it longest first.
Stage 2 (model): :meth:`Embedder.embed_tokenized` in model batches, restore input order, write
the part (``store.write_part``: staging, then rename). The in-process run chains the two in one
loop; ``nvembed_sdk.corpus.ray_job`` runs stage 1 as Ray Data tasks and stage 2 in an actor pool.
A part is the block: its size (``block_size`` rows) is independent of the model batch size.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk.corpus.source import CorpusSource, Part
from nvembed_sdk.corpus.store import DTYPES, finalize, open_job, part_done, write_part
from nvembed_sdk.errors import InputError, fmt


@dataclass(frozen=True)
class CorpusJob:
    """Settings of one ``embed-corpus`` run.

    Args:
        input: JSONL(.gz) or Parquet file, or a folder of text files.
        artifact: anything :meth:`Embedder.load` reads.
        output: the output directory (new, or the same one to resume).
        id_column: id field. Defaults to ``id``.
        text_column: text field. Defaults to ``text``.
        instruction: full prefix for every text (``query_instruction(task)`` for query corpora).
            Defaults to "" (passages).
        dtype: stored vectors, ``float32`` or ``int8`` (per-row scale). Defaults to float32.
        block_size: rows per part (the unit of work and of resumption). Defaults to 1024.
        batch_size: rows per forward pass. Defaults to the TensorRT profile's opt batch, else 32.
        max_length: truncation in tokens. Defaults to the artifact's.
        backend: backend name. Defaults to the artifact's own.
        device: device per worker. Defaults to CUDA when available, else CPU.
        precision: torch backend precision. Defaults to the backend's default.
        num_threads: torch / ORT CPU threads per worker. Defaults to None (the library's).
    """

    input: str
    artifact: str
    output: str
    id_column: str = "id"
    text_column: str = "text"
    instruction: str = ""
    dtype: str = "float32"
    block_size: int = 1024
    batch_size: int | None = None
    max_length: int | None = None
    backend: str | None = None
    device: str | None = None
    precision: str | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InputError(fmt("--dtype", repr(self.dtype), f"one of {DTYPES}"))
        for name in ("block_size", "batch_size", "max_length", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(fmt(name.replace("_", "-"), value, "an int >= 1"))

    @property
    def source(self) -> CorpusSource:
        return CorpusSource(self.input, self.id_column, self.text_column)

    def spec(self) -> dict[str, Any]:
        """What the vectors depend on; ``_job.json`` keeps it and a resumed run must match it."""
        return {"input": self.source.fingerprint(), "artifact_sha256": artifact_sha256(self.artifact),
                "backend": self.backend, "precision": self.precision, "dtype": self.dtype,
                "instruction": self.instruction, "max_length": self.max_length, "block_size": self.block_size}

    def load_embedder(self):
        from nvembed_sdk.embedder import Embedder

        if self.num_threads:
            import torch

            torch.set_num_threads(self.num_threads)
        opts: dict[str, Any] = {"precision": self.precision} if self.precision else {}
        if self.num_threads and (self.backend or _kind(self.artifact)) == "onnxruntime":
            opts["intra_op_num_threads"] = self.num_threads
        return Embedder.load(self.artifact, backend=self.backend, device=self.device, **opts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def absolute(self) -> CorpusJob:
        """The same job with absolute paths (workers on other machines, or in other directories)."""
        return replace(self, input=str(Path(self.input).resolve()), output=str(Path(self.output).resolve()),
                       artifact=str(Path(self.artifact).resolve()))


def _kind(artifact: str) -> str:
    from nvembed_sdk.embedder import detect

    return detect(artifact)[0]


@functools.lru_cache(maxsize=8)
def artifact_sha256(artifact: str) -> str:
    """sha256 of the artifact: a checkpoint's config + weights (as a bundle's manifest records
    its source), or every file of a bundle directory (names + bytes)."""
    import hashlib

    from nvembed_sdk.embedder import detect
    from nvembed_sdk.manifest import checkpoint_hash, sha256_file

    kind, _, directory = detect(artifact)
    if kind == "torch":
        return checkpoint_hash(directory)
    h = hashlib.sha256()
    for f in sorted(p for p in Path(directory).iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def text_settings(artifact: str, max_length: int | None) -> tuple[str, int]:
    """(tokenizer directory, truncation length) of an artifact, read without loading weights.

    The embedding worker checks the limit against its loaded :class:`Embedder` (``check_tokens``),
    so a disagreement with ``Embedder.load`` fails loudly instead of changing vectors.
    """
    from nvembed_sdk.config import NVEmbedConfig
    from nvembed_sdk.embedder import detect
    from nvembed_sdk.manifest import MANIFEST, read_manifest

    kind, _, directory = detect(artifact)
    if max_length is not None:
        return str(directory), max_length
    if kind == "torch":
        return str(directory), int(NVEmbedConfig.from_file(directory).max_length)
    manifest = read_manifest(directory) if (Path(directory) / MANIFEST).is_file() else {}
    return str(directory), int(manifest.get("text", {}).get("max_length") or 4096)


@functools.lru_cache(maxsize=4)
def _pipeline(directory: str, max_length: int):
    from nvembed_sdk.text import TextPipeline

    return TextPipeline(directory, max_length=max_length)  # one per worker process, reused across parts


# ---- stage 1: read, tokenise, length-sort ------------------------------------------------------


def tokenize_part(job: CorpusJob, part: Part) -> dict[str, Any]:
    """A part's rows as token ids, longest first.

    Returns:
        ``{"part", "ids", "tokens", "pos", "pool_start", "limit"}``: ``ids[i]``/``tokens[i]`` is
        input row ``part.start + pos[i]``.
    """
    directory, limit = text_settings(job.artifact, job.max_length)
    text = _pipeline(directory, limit)
    ids, texts = job.source.read(part)
    tokens = text.tokenize(texts, job.instruction, limit)
    order = np.argsort([-len(r) for r in tokens], kind="stable")
    return {"part": part.to_dict(), "ids": [ids[i] for i in order], "tokens": [tokens[i] for i in order],
            "pos": order.astype(np.int64), "pool_start": text.instruction_length(job.instruction), "limit": limit}


# ---- stage 2: embed, write ---------------------------------------------------------------------


def default_batch_size(embedder: Any, requested: int | None) -> int:
    """The requested size, else a TensorRT engine's first profile's opt batch, else 32."""
    if requested:
        return requested
    for p in embedder.manifest.get("tensorrt", {}).get("profiles", []) or []:
        try:
            return max(1, int(p["opt"][0]))
        except (KeyError, TypeError, ValueError, IndexError):
            continue
    return 32


class PartEmbedder:
    """One :class:`Embedder` that embeds tokenised parts and writes them (a Ray actor holds one)."""

    def __init__(self, job: CorpusJob, embedder: Any = None, sha256: str | None = None) -> None:
        self.job = job
        self.embedder = embedder if embedder is not None else job.load_embedder()
        self.batch_size = default_batch_size(self.embedder, job.batch_size)
        # the driver hashes the artifact once and hands the digest to every worker
        self.meta = {"artifact": str(job.artifact), "artifact_sha256": sha256 or artifact_sha256(job.artifact),
                     "backend": self.embedder.backend, "precision": self.embedder.precision,
                     "device": self.embedder.device, "instruction": job.instruction}

    def check_tokens(self, rec: dict[str, Any]) -> None:
        text = self.embedder.text
        expected = (text.instruction_length(self.job.instruction), self.job.max_length or text.max_length)
        if (rec["pool_start"], rec["limit"]) != expected:
            raise InputError(fmt("tokenised part", f"pool start {rec['pool_start']}, limit {rec['limit']}",
                                 f"{expected[0]}, {expected[1]} as the loaded artifact tokenises"))

    def __call__(self, rec: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.check_tokens(rec)
        part = Part.from_dict(rec["part"])
        vecs = self.embedder.embed_tokenized(rec["tokens"], rec["pool_start"], self.batch_size)  # (n, D)
        pos = np.asarray(rec["pos"])
        n = len(pos)
        inv = np.empty(n, dtype=np.int64)
        inv[pos] = np.arange(n)  # sorted row of each input row
        ids = [rec["ids"][i] for i in inv]
        tokens = np.array([len(rec["tokens"][i]) for i in inv], dtype=np.int32)
        write_part(self.job.output, part, ids, vecs[inv], tokens, self.job.dtype,
                   {**self.meta, "max_length": int(rec["limit"])})
        return {"part": part.index, "rows": n, "tokens": int(tokens.sum()), "seconds": time.perf_counter() - t0}


# ---- the in-process run ------------------------------------------------------------------------


def plan(job: CorpusJob) -> tuple[list[Part], list[Part]]:
    """All parts, and those still to do (after ``open_job`` created or reopened the output)."""
    parts = job.source.plan(job.block_size)
    if not parts:
        raise InputError(fmt("corpus input", f"no rows in {job.input}", "at least one passage"))
    open_job(job.output, job.spec())
    return parts, [p for p in parts if not part_done(job.output, p)]


def run_local(job: CorpusJob, show_progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Embed the corpus in this process (one :class:`Embedder`), skipping finished parts.

    Returns:
        The written ``_index.json`` plus ``{"seconds", "texts_per_s", "embedded"}``.
    """
    t0 = time.perf_counter()
    parts, todo = plan(job)
    rows = sum(p.rows for p in todo)
    log(f"{len(parts)} parts, {len(parts) - len(todo)} already done; embedding {rows:,} texts in-process")
    worker = PartEmbedder(job)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(p.rows for p in parts), initial=sum(p.rows for p in parts) - rows, unit="text",
                   desc="embed-corpus")
    for part in todo:
        worker(tokenize_part(job, part))
        if bar is not None:
            bar.update(part.rows)
    if bar is not None:
        bar.close()
    index = finalize(job.output, parts)
    dt = time.perf_counter() - t0
    return {**index, "embedded": rows, "seconds": dt, "texts_per_s": rows / dt if dt > 0 else 0.0}


__all__ = ["CorpusJob", "PartEmbedder", "artifact_sha256", "plan", "run_local", "text_settings", "tokenize_part"]
