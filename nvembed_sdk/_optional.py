"""Import-or-explain for heavy optional packages (never auto-installs)."""

from __future__ import annotations

import importlib
from types import ModuleType

from nvembed_sdk.errors import BackendUnavailableError

# module name -> (extra that installs it, minimum version, extra hint)
_KNOWN: dict[str, tuple[str, str, str]] = {
    "onnxruntime": ("onnx", "1.20", "install onnxruntime-gpu (it includes the CPU provider)"),
    "onnx": ("onnx", "1.17", ""),
    "onnxscript": ("onnx", "0.3", ""),
    "tensorrt": ("tensorrt", "10.3", "on Jetson, TensorRT comes with JetPack"),
    "modelopt": ("quant", "0.40", "package nvidia-modelopt[onnx]"),
    "peft": ("train", "0.12", ""),
    "ray": ("ray", "2.40", "ray[data,serve]"),
    "pyarrow": ("ray", "14", ""),
    "sentence_transformers": ("st", "6.0", "package sentence-transformers"),
    "langchain_core": ("langchain", "1.0", "package langchain-core"),
    "llama_index.core": ("llamaindex", "0.14", "package llama-index-core"),
    "mteb": ("mteb", "2.0", ""),
}


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def require(name: str) -> ModuleType:
    """Import ``name`` or raise a :class:`BackendUnavailableError` that says how to install it.

    Args:
        name: module name, e.g. ``"onnxruntime"``.

    Returns:
        The imported module.

    Raises:
        BackendUnavailableError: the module is missing or older than the minimum.
    """
    extra, min_version, hint = _KNOWN.get(name, ("", "0", ""))
    # nvembed-sdk is not on PyPI: the extra installs from a checkout of the repository.
    how = f"pip install -e '.[{extra}]' from the nvembed-sdk checkout" if extra else f"pip install {name}"
    if hint:
        how += f" ({hint})"
    try:
        mod = importlib.import_module(name)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"{name} | is not installed ({exc}). Note: {how}; needs {name} >= {min_version}"
        ) from exc
    version = getattr(mod, "__version__", None)
    if version is not None and _version_tuple(version) < _version_tuple(min_version):
        raise BackendUnavailableError(
            f"{name} | version {version} is too old. Note: needs >= {min_version}; {how}"
        )
    return mod


def available(name: str) -> bool:
    """True when ``name`` imports (without raising)."""
    try:
        require(name)
    except BackendUnavailableError:
        return False
    return True
