"""One exception family for the SDK.

Messages follow the template ``subject | what was received. Note: what was expected``
so that a one-line CLI error tells the user both the problem and the fix.
"""

from __future__ import annotations


class NVEmbedError(Exception):
    """Base class of every error the SDK raises on purpose."""


class BackendUnavailableError(NVEmbedError, ImportError):
    """An optional backend package (onnxruntime, tensorrt, modelopt, CUDA) is missing."""


class ArtifactError(NVEmbedError, ValueError):
    """A path is missing, is not an artifact the SDK knows, or is corrupt or mismatched."""


class TensorRTError(NVEmbedError):
    """TensorRT refused a call whose result the SDK checks (an execution context, an
    optimisation profile, a tensor address or input shape, an enqueue)."""


class InputError(NVEmbedError, TypeError):
    """Bad input to ``embed`` (non-string items, impossible lengths, ...)."""


class ParityError(NVEmbedError):
    """Two artifacts disagree."""


class ShapeMismatch(ParityError):
    """The two sides returned arrays of different shapes."""


class ToleranceExceeded(ParityError):
    """The per-row cosine (or retrieval agreement) is outside the budget."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


def fmt(subject: str, received: object, expected: str) -> str:
    """Build a message in the house template."""
    return f"{subject} | got {received}. Note: {expected}"
