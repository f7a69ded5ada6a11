"""PyTorch backend: a released-layout checkpoint run by :class:`nvembed_sdk.model.NVEmbedModel`.

Precisions:
    ``fp32``, ``bf16``, ``fp16``: weights and activations in that dtype (RMSNorm statistics,
    pooling and normalisation always fp32).
    ``autocast``: fp32 weights run under ``torch.autocast(dtype=float16)``, which reproduces the
    released code's numerics on CUDA (fp16 matmuls and attention, fp32 residual stream and
    norms; reference/NV-Embed-v2.md §3.1).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from nvembed_sdk.checkpoint import load_model
from nvembed_sdk.config import NVEmbedConfig
from nvembed_sdk.errors import BackendUnavailableError, InputError, fmt
from nvembed_sdk.runtimes.base import Backend
from nvembed_sdk.text import Batch
from nvembed_sdk.validate import Option

PRECISIONS = ("fp32", "bf16", "fp16", "autocast")
_WEIGHT_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "autocast": torch.float32}


def resolve_device(device: str | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            fmt("device", repr(device), "CUDA is not available here; use device='cpu' or a CUDA build of torch")
        )
    return dev


class TorchBackend(Backend):
    """Runs a checkpoint directory with PyTorch.

    Options:
        precision: one of ``fp32``, ``bf16``, ``fp16``, ``autocast``. Defaults to ``fp32`` on
            CPU and ``fp16`` on CUDA (the released storage dtype; on the full NV-Embed-v2 shape fp16
            kept per-row cosine 0.9994 against the released autocast numerics where bf16 gave 0.985).
        model: an already-built :class:`NVEmbedModel` to wrap instead of loading (training, tests).
    """

    name = "torch"
    OPTIONS = {
        "precision": Option(str, "fp32, bf16, fp16 or autocast", choices=PRECISIONS),
        "model": Option(torch.nn.Module, "an NVEmbedModel to wrap"),
    }

    def _load(self) -> None:
        dev = resolve_device(self.requested_device)
        precision = self.options.get("precision") or ("fp32" if dev.type == "cpu" else "fp16")
        if precision not in PRECISIONS:
            raise InputError(fmt("precision", repr(precision), f"one of {PRECISIONS} for the torch backend"))
        model = self.options.get("model")
        if model is None:
            model = load_model(self.path, dtype=_WEIGHT_DTYPE[precision], device=dev)
        else:
            model = model.to(device=dev, dtype=_WEIGHT_DTYPE[precision]).eval()
        self.model = model
        self.cfg: NVEmbedConfig = model.cfg
        self.precision = precision
        self.device = str(dev)
        self.dim = self.cfg.dim
        self.normalizes_output = False  # the Embedder decides
        self.max_length = self.cfg.max_length
        self.manifest = {
            "kind": "checkpoint",
            "precision": precision,
            "model": {"dim": self.dim, "num_parameters": self.cfg.num_parameters,
                      "layers": self.cfg.text.num_hidden_layers, "hidden_size": self.cfg.text.hidden_size,
                      "max_position_embeddings": self.cfg.text.max_position_embeddings},
            "text": {"mask_instruction": self.cfg.is_mask_instruction},
        }

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "autocast":
            return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.float16)
        return contextlib.nullcontext()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised pooled embeddings (B, D) float32, as tensors on the backend's device."""
        with self._autocast():
            return self.model(input_ids, attention_mask, pool_mask, normalize=False)

    @torch.inference_mode()
    def _run(self, batch: Batch) -> np.ndarray:
        dev = torch.device(self.device)
        t = {k: torch.from_numpy(v).to(dev, non_blocking=True) for k, v in batch.as_dict().items()}
        out = self.forward(t["input_ids"], t["attention_mask"], t["pool_mask"])
        return out.float().cpu().numpy()

    def _close(self) -> None:
        del self.model


