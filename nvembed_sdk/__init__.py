"""nvembed-sdk: NV-Embed from training to deployment on NVIDIA GPUs.

``import nvembed_sdk`` needs only torch, tokenizers, numpy, safetensors and click; onnxruntime,
tensorrt and modelopt load lazily when a backend or exporter needs them.
"""

from __future__ import annotations

from nvembed_sdk.checkpoint import load_model, save_model
from nvembed_sdk.config import PRESETS, NVEmbedConfig
from nvembed_sdk.embedder import DEFAULT_TASK, Embedder, query_instruction
from nvembed_sdk.errors import (
    ArtifactError,
    BackendUnavailableError,
    InputError,
    NVEmbedError,
    ParityError,
    ShapeMismatch,
    ToleranceExceeded,
)
from nvembed_sdk.model import NVEmbedModel
from nvembed_sdk.text import TextPipeline

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TASK",
    "PRESETS",
    "ArtifactError",
    "BackendUnavailableError",
    "Embedder",
    "InputError",
    "NVEmbedConfig",
    "NVEmbedError",
    "NVEmbedModel",
    "ParityError",
    "ShapeMismatch",
    "TextPipeline",
    "ToleranceExceeded",
    "__version__",
    "load_model",
    "query_instruction",
    "save_model",
]
