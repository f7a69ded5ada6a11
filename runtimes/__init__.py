"""Runtime backends behind one protocol (:class:`nvembed_sdk.runtimes.base.Backend`).

Backends are named by string and imported only when used, so ``import nvembed_sdk`` never
imports onnxruntime or tensorrt.
"""

from __future__ import annotations

import importlib

from nvembed_sdk.errors import BackendUnavailableError, InputError, fmt

BACKENDS: dict[str, str] = {
    "torch": "nvembed_sdk.runtimes.pt:TorchBackend",
    "onnxruntime": "nvembed_sdk.runtimes.ort:OrtBackend",
    "tensorrt": "nvembed_sdk.runtimes.trt:TrtBackend",
}

# The package each backend needs at run time.
_REQUIRES = {"torch": "torch", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}


def backend_class(name: str) -> type:
    """The backend class for ``name`` (imports its module lazily)."""
    if name not in BACKENDS:
        raise InputError(fmt("backend", repr(name), f"one of {sorted(BACKENDS)}"))
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def available_backends() -> dict[str, str | None]:
    """Backend name -> None when usable here, else the reason it is not."""
    from nvembed_sdk._optional import require

    out: dict[str, str | None] = {}
    for name, pkg in _REQUIRES.items():
        try:
            require(pkg)
            out[name] = None
        except BackendUnavailableError as exc:
            out[name] = str(exc)
    return out


__all__ = ["BACKENDS", "available_backends", "backend_class"]
