"""``Embedder``: one API over every artifact and backend.

Pre (text pipeline), core (backend) and post (ordering, normalisation, dtype) are split so that
backends only map ``(input_ids, attention_mask, pool_mask) -> (B, D)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk.bundle_files import check_token_range, model_vocab_size, same_file, verify_files
from nvembed_sdk.bundle_files import model_file as bundle_model_file
from nvembed_sdk.errors import ArtifactError, InputError, fmt
from nvembed_sdk.manifest import MANIFEST, read_manifest
from nvembed_sdk.text import TextPipeline, check_texts, check_utf8

log = logging.getLogger("nvembed_sdk")

DEFAULT_TASK = "Given a question, retrieve passages that answer the question"


def query_instruction(task: str) -> str:
    """The NV-Embed-v2 query prefix: ``"Instruct: {task}\\nQuery: "``."""
    return f"Instruct: {task}\nQuery: "


def detect(path: str | Path) -> tuple[str, Path, Path]:
    """Classify an artifact path.

    Returns:
        (backend name, path to hand the backend, directory holding tokenizer/manifest).

    Raises:
        ArtifactError: the path is missing or is not an artifact this SDK knows.
    """
    if not isinstance(path, str | Path):  # Path(None) raised a bare TypeError
        raise InputError(fmt("artifact path", f"{type(path).__name__} {path!r:.40}", "a str or pathlib.Path"))
    p = Path(path)
    if not p.exists():
        raise ArtifactError(fmt("artifact", f"{p} does not exist",
                                "a checkpoint dir, a bundle dir, a model.onnx or an engine.plan"))
    if p.is_file():
        if (p.parent / MANIFEST).is_file():  # a file inside a bundle must be the bundle's model file
            same_file(p, bundle_model_file(p.parent, read_manifest(p.parent)))
        if p.suffix == ".onnx":
            return "onnxruntime", p, p.parent
        if p.suffix in (".plan", ".engine", ".trt"):
            return "tensorrt", p, p.parent
        raise ArtifactError(fmt("artifact", f"file {p.name}", "a .onnx or .plan file (or a directory)"))
    if (p / MANIFEST).is_file():
        m = read_manifest(p)
        kind = m.get("kind")
        model_file = bundle_model_file(p, m) if kind in ("onnx", "tensorrt") else p  # inside the bundle only
        if kind == "onnx":
            return "onnxruntime", model_file, p
        if kind == "tensorrt":
            return "tensorrt", model_file, p
        raise ArtifactError(fmt(str(p / MANIFEST), f"kind {kind!r}", "kind 'onnx' or 'tensorrt'"))
    if (p / "config.json").is_file():
        if any(p.glob("*.safetensors")):
            return "torch", p, p
        raise ArtifactError(fmt(str(p), "config.json but no *.safetensors weights",
                                "a checkpoint with weights (`nvembed info` reads config-only dirs)"))
    raise ArtifactError(fmt(str(p), "a directory without config.json or nvembed.json",
                            "an NV-Embed checkpoint dir or a bundle written by nvembed-export"))


def check_finite(vectors: np.ndarray, index: Sequence[int] | np.ndarray, where: str,
                 precision: str | None = None) -> None:
    """Raise ArtifactError naming the texts whose vectors hold NaN or Inf.

    A finite input never makes a sound model give NaN, so the artifact is at fault: weights
    overwritten on disk, an ``rms_norm_eps`` <= 0, an fp16 overflow, a NaN checkpoint.
    """
    bad = ~np.isfinite(vectors).all(axis=1)  # (B,)
    if bad.any():
        rows = sorted(int(i) for i in np.asarray(index)[bad])
        fix = ("the model's weights or config are corrupt; re-export or re-train it" if precision == "fp32" else
               "the model's weights or config are corrupt or overflow at this precision; "
               "re-export or re-train it, or try fp32")
        raise ArtifactError(fmt(f"embeddings from {where}", f"NaN/Inf for texts {rows[:10]}"
                                f"{' ...' if len(rows) > 10 else ''}", fix))


class Embedder:
    """Embed texts with any NV-Embed artifact.

    Build with :meth:`Embedder.load`. Thread-safe for concurrent ``embed`` calls on the
    ONNX Runtime and PyTorch backends.
    """

    def __init__(self, backend: Any, text: TextPipeline) -> None:
        self._backend = backend
        self.text = text

    @classmethod
    def load(cls, path: str | Path, backend: str | None = None, device: str | None = None, verify: bool = False,
             **options: Any) -> Embedder:
        """Load a checkpoint dir, a bundle dir, a ``model.onnx`` or an ``engine.plan``.

        Args:
            path: the artifact.
            backend: ``torch``, ``onnxruntime`` or ``tensorrt``. Defaults to the artifact's own.
            device: ``cpu``, ``cuda``, ``cuda:N``. Defaults to CUDA when available, else CPU.
            verify: also hash a bundle's files of 2 GB and more against its manifest (sizes,
                and hashes of smaller files, are always checked). Defaults to False.
            **options: backend options, e.g. ``precision="bf16"`` (torch) or
                ``providers=[...]``, ``intra_op_num_threads=2`` (onnxruntime).

        Returns:
            A ready :class:`Embedder`.

        Raises:
            ArtifactError: unknown, missing or corrupt artifact.
            BackendUnavailableError: the backend's package or device is missing.
        """
        from nvembed_sdk.runtimes import backend_class

        if backend is not None:
            backend_class(backend)  # an unknown name lists the valid backends, before the artifact is read
        kind, model_path, directory = detect(path)
        manifest = read_manifest(directory) if kind != "torch" and (directory / MANIFEST).is_file() else None
        if manifest is not None:
            verify_files(directory, manifest, full=verify)  # sizes, and sha256 under 2 GB (all with verify)
        check_token_range(directory, model_vocab_size(kind, directory, manifest))  # before any weights load
        name = backend or kind
        if name == "torch" and kind != "torch":
            raise ArtifactError(fmt("backend 'torch'", f"a {kind} artifact", "a checkpoint directory"))
        if kind == "torch" and name != "torch":
            raise ArtifactError(fmt(f"backend {name!r}", "a checkpoint directory",
                                    "export it first: nvembed-export --model DIR --to onnx --output OUT"))
        impl = backend_class(name)(model_path, device=device, **options).load()
        max_length = impl.max_length or 4096
        # is_mask_instruction false (config.json, or the bundle's text settings): the released
        # encode() then pools the instruction tokens too (reference/NV-Embed-v2.md §4.1 step 3).
        mask = impl.manifest.get("text", {}).get("mask_instruction", True) is not False
        positions = impl.manifest.get("model", {}).get("max_position_embeddings")
        if isinstance(positions, int) and max_length > positions:
            log.warning("max_length %d is above the model's %d positions; using %d", max_length, positions, positions)
            max_length = positions
        return cls(impl, TextPipeline(directory, max_length=max_length, mask_instruction=mask))

    # ---- properties --------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self._backend.dim)

    @property
    def backend(self) -> str:
        return str(self._backend.name)

    @property
    def precision(self) -> str:
        return str(self._backend.precision)

    @property
    def device(self) -> str:
        return str(self._backend.device)

    @property
    def emulated(self) -> bool:
        return bool(self._backend.emulated)

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(self._backend.manifest)

    @property
    def runner(self) -> Any:
        """The loaded backend object (advanced use)."""
        return self._backend

    def __repr__(self) -> str:
        return f"Embedder({self._backend.describe()}, dim={self.dim}, path={str(self._backend.path)!r})"

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- embedding ---------------------------------------------------------------------------

    def embed(
        self,
        texts: str | Sequence[str],
        instruction: str = "",
        batch_size: int = 32,
        max_length: int | None = None,
        normalize: bool = True,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Embed texts.

        Args:
            texts: a str or a list of str.
            instruction: the full prefix, exactly as NV-Embed-v2's ``encode(instruction=...)``;
                its tokens are excluded from pooling. Defaults to "" (passages).
            batch_size: texts per forward pass (batches are length-sorted). Defaults to 32.
            max_length: truncation length in tokens. Defaults to the artifact's.
            normalize: L2-normalise. Defaults to True. Exported artifacts normalise inside the
                graph, so only the torch backend accepts False.
            show_progress: tqdm bar over batches. Defaults to False.

        Returns:
            float32 array (N, dim) in input order; (dim,) for a single str; (0, dim) for [].

        Raises:
            InputError: a non-string item, ``batch_size < 1``, or ``max_length`` not above the
                instruction's length.
        """
        single = isinstance(texts, str)
        items = check_texts(texts)
        if not isinstance(instruction, str):
            raise InputError(fmt("instruction", type(instruction).__name__, "a str"))
        check_utf8(instruction, "instruction")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(fmt("batch_size", batch_size, "an int >= 1"))
        if not isinstance(normalize, bool | np.bool_):  # "no" was truthy: normalised without a word
            raise InputError(fmt("normalize", repr(normalize), "True or False"))
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise InputError(fmt("max_length", max_length, "an int >= 1 or None"))
        positions = self.manifest.get("model", {}).get("max_position_embeddings")
        if max_length is not None and isinstance(positions, int) and max_length > positions:
            raise InputError(fmt("max_length", max_length, f"at most the model's {positions} positions"))
        if not normalize and self._backend.normalizes_output:
            raise InputError(fmt("normalize=False", f"the {self.backend} artifact",
                                 "exported graphs normalise inside; use the checkpoint (torch backend)"))
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        limit = max_length or self.text.max_length
        ids = self.text.tokenize(items, instruction, limit)
        start = self.text.instruction_length(instruction)
        order = np.argsort([-len(r) for r in ids], kind="stable")  # longest first
        out = np.empty((len(items), self.dim), dtype=np.float32)
        batches = range(0, len(order), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="embed", unit="batch")
        for lo in batches:
            idx = order[lo : lo + batch_size]
            batch = self.text.collate([ids[i] for i in idx], start)
            out[idx] = self._backend.run(batch)
        check_finite(out, np.arange(len(items)), self._backend.describe(), self.precision)  # every batch, all bad texts named
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, 1e-12)
        return out[0] if single else out

    def embed_queries(self, texts: str | Sequence[str], task: str = DEFAULT_TASK, **kwargs: Any) -> np.ndarray:
        """Embed queries with ``"Instruct: {task}\\nQuery: "`` (see :meth:`embed`)."""
        return self.embed(texts, instruction=query_instruction(task), **kwargs)

    def embed_documents(self, texts: str | Sequence[str], **kwargs: Any) -> np.ndarray:
        """Embed passages: no instruction, BOS..EOS pooled (see :meth:`embed`)."""
        return self.embed(texts, instruction="", **kwargs)

    def embed_tokenized(self, ids: Sequence[Sequence[int]], pool_start: int = 0, batch_size: int = 32,
                        normalize: bool = True) -> np.ndarray:
        """Embed rows that ``self.text.tokenize`` already produced (e.g. a Ray CPU stage).

        Args:
            ids: token ids per row, from ``self.text.tokenize(texts, instruction, max_length)``.
            pool_start: ``self.text.instruction_length(instruction)``; those leading positions
                leave the pool (``TextPipeline.collate`` applies the rule). Defaults to 0 (passages).
            batch_size: rows per forward pass, longest first. Defaults to 32.
            normalize: L2-normalise. Defaults to True.

        Returns:
            float32 array (N, dim) in row order.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(fmt("batch_size", batch_size, "an int >= 1"))
        if not normalize and self._backend.normalizes_output:
            raise InputError(fmt("normalize=False", f"the {self.backend} artifact", "the torch backend"))
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        order = np.argsort([-len(r) for r in ids], kind="stable")  # longest first
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            out[idx] = self._backend.run(self.text.collate([ids[i] for i in idx], pool_start))
        if normalize and len(out):
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
