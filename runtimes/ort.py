"""ONNX Runtime backend: one session per artifact, CUDA with IO binding when available, else CPU.

A CUDA or TensorRT execution provider that was asked for (``device="cuda"``, or named in
``providers``) and does not start raises :class:`BackendUnavailableError` with ONNX Runtime's
reason: ORT itself only logs the failure and runs on the CPU (``InferenceSession`` keeps the
providers that started, ``session.get_providers()``). With ``device=None`` (auto) a CPU run is
the intended fallback and is said in one line per process; ``device="cpu"`` says nothing.

FP8 Q/DQ graphs run on the CPU as an emulation (E4M3 rounding at every Q/DQ pair); ONNX Runtime
before 1.32 fails on them at the default optimisation level (its fusions produce kernels with no
float8 implementation), so those graphs get ``ORT_ENABLE_BASIC`` there.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk._optional import _version_tuple, require
from nvembed_sdk.errors import ArtifactError, BackendUnavailableError, InputError, fmt
from nvembed_sdk.manifest import INPUT_NAMES, MANIFEST, OUTPUT_NAME, read_manifest
from nvembed_sdk.runtimes.base import Backend
from nvembed_sdk.text import Batch

log = logging.getLogger("nvembed_sdk.ort")

_OPT_LEVELS = ("disable", "basic", "extended", "all")
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_fallback_said = False  # the auto-device CPU fallback line, once per process
_capture_lock = threading.Lock()  # fd 2 is process-wide: one capture at a time, or a nested restore loses stderr


class OrtBackend(Backend):
    """Runs ``model.onnx`` from a bundle with ONNX Runtime.

    Options:
        providers: explicit provider list (e.g. ``["CPUExecutionProvider"]``); every CUDA or
            TensorRT provider named must start, else :class:`BackendUnavailableError`. Defaults
            to CUDA when ``device`` is not ``cpu`` and CUDA is available, else CPU (``device="cuda"``
            requires CUDA to start; ``device=None`` falls back to the CPU, saying so once).
        intra_op_num_threads: threads per operator. Defaults to ONNX Runtime's choice.
        inter_op_num_threads: threads across operators. Defaults to ONNX Runtime's choice.
        graph_optimization_level: ``disable|basic|extended|all``. Defaults to ``all``
            (``basic`` for FP8 graphs on ONNX Runtime < 1.32).
        cpu_int8_u8_activations: on the CPU, run INT8 bundles with uint8 activation Q/DQ (an
            exact re-encoding, see :func:`_u8_activation_bytes`) so the x86 integer kernels
            are used. Defaults to True.
    """

    name = "onnxruntime"

    def _load(self) -> None:
        ort = require("onnxruntime")
        model = self.path if self.path.is_file() else self.path / "model.onnx"
        if not model.is_file():
            raise ArtifactError(fmt("onnx model", f"no file at {model}", "a bundle with model.onnx"))
        directory = model.parent
        self.manifest = read_manifest(directory) if (directory / MANIFEST).is_file() else {}
        self.precision = str(self.manifest.get("precision", "fp32"))
        self.dim = int(self.manifest.get("model", {}).get("dim", 0))
        self.max_length = self.manifest.get("text", {}).get("max_length")
        self.normalizes_output = True

        so = ort.SessionOptions()
        for key in ("intra_op_num_threads", "inter_op_num_threads"):
            if self.options.get(key) is not None:
                setattr(so, key, int(self.options[key]))
        level = self.options.get("graph_optimization_level")
        old_ort = _version_tuple(ort.__version__) < (1, 32)
        if level is None:
            level = "basic" if (self.precision == "fp8" and old_ort) else "all"
        if level not in _OPT_LEVELS:
            raise InputError(fmt("graph_optimization_level", repr(level), f"one of {_OPT_LEVELS}"))
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        so.log_severity_level = 3
        providers, required = self._providers(ort)
        source: str | bytes = str(model)
        self.rewritten = False
        on_cpu = _name(providers[0]) == "CPUExecutionProvider"
        if self.precision == "int8" and on_cpu and self.options.get("cpu_int8_u8_activations", True):
            source = _u8_activation_bytes(model) or source
            self.rewritten = not isinstance(source, str)
        gpu = [p for p in map(_name, providers) if p in _GPU_PROVIDERS]
        try:
            with _ort_log(capture=bool(gpu)) as logged:
                self.session = ort.InferenceSession(source, sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own exception types (InvalidGraph, Fail, ...)
            raise ArtifactError(fmt(str(model), f"ONNX Runtime could not load it ({str(exc)[:300]})",
                                    "a bundle written by nvembed-export with this SDK")) from exc
        started = self.session.get_providers()
        failed = [p for p in gpu if p not in started]
        if failed and required:
            del self.session
            raise BackendUnavailableError(fmt(
                f"onnxruntime {', '.join(failed)}", f"did not start (ONNX Runtime: {_reason(logged.text)})",
                "onnxruntime-gpu with the CUDA and cuDNN libraries it was built for (and TensorRT for its "
                "provider) on a machine with an NVIDIA GPU; or device='cpu'"))
        if failed:
            _say_fallback(f"onnxruntime: {', '.join(failed)} did not start ({_reason(logged.text)}); "
                          f"running {model} on the CPU", warning=True)
        elif logged.text:
            sys.stderr.write(logged.text)  # started after all: pass ORT's own lines on, unchanged
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if sorted(names_in) != sorted(INPUT_NAMES) or OUTPUT_NAME not in names_out:
            raise ArtifactError(fmt(str(model), f"inputs {names_in}, outputs {names_out}",
                                    f"inputs {list(INPUT_NAMES)} and output {OUTPUT_NAME!r}"))
        if not self.dim:
            shape = self.session.get_outputs()[0].shape
            self.dim = int(shape[-1]) if isinstance(shape[-1], int) else 0
        used = started[0]
        wanted = self.requested_device or ""
        self.device = (wanted if wanted.startswith("cuda") else "cuda") if used in _GPU_PROVIDERS else "cpu"
        self.emulated = self.precision == "fp8" and self.device == "cpu"
        self.opt_level = level
        if self.emulated:
            log.info("FP8 Q/DQ graph emulated on the CPU (E4M3 rounding at each Q/DQ pair); "
                     "native FP8 needs TensorRT on compute capability >= 8.9")

    def _providers(self, ort: Any) -> tuple[list[Any], bool]:
        """The provider list and whether its CUDA/TensorRT providers are required (no CPU fallback)."""
        explicit = self.options.get("providers")
        available = ort.get_available_providers()
        if explicit:
            missing = [_name(p) for p in explicit if _name(p) not in available]
            if missing:
                raise BackendUnavailableError(fmt("onnxruntime providers", f"{missing} not available",
                                                  f"available here: {available}"))
            return list(explicit), True
        device = self.requested_device or "auto"
        if device == "cpu":
            return ["CPUExecutionProvider"], False
        wants_cuda = device.startswith("cuda")
        if wants_cuda and "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(fmt("device", repr(device),
                                              f"this onnxruntime has no CUDAExecutionProvider (available: {available}); "
                                              "install onnxruntime-gpu, or use device='cpu'"))
        if wants_cuda or ("CUDAExecutionProvider" in available and _cuda_usable()):
            # device="cuda" is tried even when torch sees no GPU: ONNX Runtime then says why it cannot start.
            dev_id = int(device.split(":")[1]) if ":" in device else 0
            return [("CUDAExecutionProvider", {"device_id": dev_id}), "CPUExecutionProvider"], wants_cuda
        _say_fallback("onnxruntime: no CUDA GPU here, running on the CPU (device='cpu' asks for it without this line)")
        return ["CPUExecutionProvider"], False

    def _run(self, batch: Batch) -> np.ndarray:
        feeds = batch.as_dict()
        if self.device.startswith("cuda"):
            binding = self.session.io_binding()
            for name, arr in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(arr))
            binding.bind_output(OUTPUT_NAME)
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return self.session.run([OUTPUT_NAME], feeds)[0]

    def _close(self) -> None:
        del self.session


def _u8_activation_bytes(model: Path) -> bytes | None:
    """The INT8 graph with activation Q/DQ moved from int8 (zero point 0) to uint8 (zero point 128).

    ModelOpt writes symmetric int8 activations, the form TensorRT needs. With them ONNX Runtime
    1.24's CPU optimiser fuses DQ -> MatMul into ``MatMulIntegerToFloat`` only where the activation
    DequantizeLinear has one consumer: q/k/v and gate/up share one (common-subexpression
    elimination merges copies), so 20 of the shipped model's 28 projections ran in float behind
    DequantizeLinear (measured: 8 of 28 fused; with uint8 activations all 28, 1.7x faster).
    ``q_u8 = q_s8 + 128`` with zero point 128 is the same quantisation grid (same scale, same
    rounding, same clipping), so this rewrite changes kernels, not numerics. In memory only; graphs over 2 GB are left alone.
    """
    import onnx
    from onnx import numpy_helper

    if model.stat().st_size > 1_900_000_000 or (model.parent / (model.name + ".data")).exists():
        return None
    proto = onnx.load(str(model))
    inits = {t.name: t for t in proto.graph.initializer}
    done: set[str] = set()
    for node in proto.graph.node:
        # Activation quantisers only: the input is computed, not a stored weight.
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        zp_name = node.input[2]
        if zp_name in done or zp_name not in inits:
            continue
        zp = numpy_helper.to_array(inits[zp_name])
        if zp.dtype != np.int8 or zp.any():
            continue
        inits[zp_name].CopyFrom(numpy_helper.from_array(np.full(zp.shape, 128, dtype=np.uint8), zp_name))
        done.add(zp_name)
    return proto.SerializeToString() if done else None


def _cuda_usable() -> bool:
    # onnxruntime-gpu lists CUDAExecutionProvider even without a GPU; check for a device first.
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a core dependency
        return Path("/dev/nvidia0").exists()


def _name(provider: Any) -> str:
    return provider if isinstance(provider, str) else str(provider[0])  # "Name" or ("Name", {options})


def _say_fallback(line: str, warning: bool = False) -> None:
    global _fallback_said
    if not _fallback_said:
        _fallback_said = True
        (log.warning if warning else log.info)(line)


class _Logged:
    text = ""


@contextlib.contextmanager
def _ort_log(capture: bool) -> Iterator[_Logged]:
    """Collect what ONNX Runtime writes while a session starts: its C++ logger writes to fd 2
    (why a provider failed) and its Python fallback prints to stdout ("EP Error ... Falling back")."""
    logged = _Logged()
    if not capture:
        yield logged
        return
    with _capture_lock, tempfile.TemporaryFile(mode="w+b") as sink, \
            contextlib.redirect_stdout(io.StringIO()) as printed:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield logged
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            logged.text = sink.read().decode(errors="replace") + printed.getvalue()


def _reason(text: str) -> str:
    """ONNX Runtime's own words for a provider that did not start, one line, shortened."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [" ".join(line.split()) for line in plain.splitlines()]
    # "2026-12-01 20:30:38.9 [E:onnxruntime:Default, file.cc:2359 Func] /src/file.cc:1952 Sig [ONNXRuntimeError] : 1 : FAIL : text"
    strip = (r"^\S+ \S+ \[[EW]:onnxruntime:[^\]]*\] ", r"^/\S+:\d+ .*?\[ONNXRuntimeError\] : \d+ : \w+ : ",
             r" Please install all dependencies as mentioned in the GPU requirements page.*$")
    keep = []
    for line in lines:
        if re.search(r"fail|error|cannot|not found|require", line, re.I) and "Falling back" not in line:
            for pattern in strip:
                line = re.sub(pattern, "", line)
            keep.append(line)
    reason = " | ".join(dict.fromkeys(k for k in keep if k))
    return (reason[:400] + " ...") if len(reason) > 400 else (reason or "no reason logged")
