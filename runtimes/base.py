"""The backend protocol: ``(input_ids, attention_mask, pool_mask) -> float32 (B, D)``.

Public methods check state, shapes and dtypes once; subclasses implement only ``_load``,
``_run`` and ``_close`` (Polygraphy's runner template). Tokenisation, batching, ordering and
normalisation live in :class:`nvembed_sdk.Embedder`, never here.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk.errors import ArtifactError, NVEmbedError, fmt
from nvembed_sdk.text import Batch
from nvembed_sdk.validate import Option, check_device, check_options


class Backend(ABC):
    """One loaded artifact on one device.

    Attributes:
        name: backend name (``torch``, ``onnxruntime``, ``tensorrt``).
        precision: numeric precision of the artifact as run.
        dim: embedding width.
        device: where it runs (``cpu``, ``cuda:0``).
        normalizes_output: the artifact already returns L2-normalised vectors.
        emulated: the numerics are emulated (e.g. FP8 Q/DQ on a CPU).
        manifest: the artifact's manifest (bundles) or a summary (checkpoints).
    """

    name = "base"
    # Each backend declares its options (name -> type, help); an unknown or mistyped one is an
    # InputError listing these, never silently ignored (a typo such as ``precison``).
    OPTIONS: dict[str, Option] = {}

    def __init__(self, path: str | Path, device: str | None = None, **options: Any) -> None:
        check_device(device)
        self.path = Path(path)
        self.requested_device = device
        self.options = check_options(self.name, self.OPTIONS, options)
        self.precision = "fp32"
        self.dim = 0
        self.device = "cpu"
        self.normalizes_output = True
        self.emulated = False
        self.manifest: dict[str, Any] = {}
        self.max_length: int | None = None
        self._loaded = False
        self._lock = threading.Lock()

    def load(self) -> Backend:
        with self._lock:
            if not self._loaded:
                if not self.path.exists():
                    raise ArtifactError(fmt("artifact", f"{self.path} does not exist", "an existing path"))
                self._load()
                self._loaded = True
        return self

    def run(self, batch: Batch) -> np.ndarray:
        """Run one batch; returns (B, dim) float32."""
        if not self._loaded:
            raise NVEmbedError(fmt(f"{self.name} backend", "not loaded", "call load() first"))
        ids, mask, pool = batch.input_ids, batch.attention_mask, batch.pool_mask
        if not (ids.shape == mask.shape == pool.shape) or ids.ndim != 2:
            raise NVEmbedError(fmt("batch", f"shapes {ids.shape}, {mask.shape}, {pool.shape}", "three equal (B, T)"))
        out = self._run(batch)
        if out.shape != (ids.shape[0], self.dim):
            raise NVEmbedError(fmt(f"{self.name} output", f"shape {out.shape}", f"({ids.shape[0]}, {self.dim})"))
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        with self._lock:
            if self._loaded:
                self._close()
                self._loaded = False

    def __enter__(self) -> Backend:
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _run(self, batch: Batch) -> np.ndarray: ...

    def _close(self) -> None:  # noqa: B027 - optional hook
        pass

    def describe(self) -> str:
        extra = " (emulated)" if self.emulated else ""
        return f"{self.name} {self.precision}{extra} on {self.device}"
