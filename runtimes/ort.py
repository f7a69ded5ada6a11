"""ONNX Runtime backend: one session per artifact, CUDA with IO binding when available, else CPU.

FP8 Q/DQ graphs run on the CPU as an emulation (E4M3 rounding at every Q/DQ pair); ONNX Runtime
before 1.32 fails on them at the default optimisation level (its fusions produce kernels with no
float8 implementation), so those graphs get ``ORT_ENABLE_BASIC`` there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk._optional import _version_tuple, require
from nvembed_sdk.errors import ArtifactError, BackendUnavailableError, InputError, fmt
from nvembed_sdk.manifest import INPUT_NAMES, MANIFEST, OUTPUT_NAME, check_manifest_types, read_manifest
from nvembed_sdk.runtimes.base import Backend
from nvembed_sdk.text import Batch
from nvembed_sdk.validate import Option

log = logging.getLogger("nvembed_sdk.ort")

_OPT_LEVELS = ("disable", "basic", "extended", "all")


def _provider_list(value: Any) -> bool:
    # ["CPUExecutionProvider"] or [("CUDAExecutionProvider", {"device_id": 0}), ...]; a bare str is refused
    # (iterating it would give single characters).
    return all(isinstance(p, str) or (isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
                                      and isinstance(p[1], dict)) for p in value)


def _threads(value: int) -> bool:
    return value >= 0


class OrtBackend(Backend):
    """Runs ``model.onnx`` from a bundle with ONNX Runtime.

    Options:
        providers: explicit provider list (e.g. ``["CPUExecutionProvider"]``). Defaults to CUDA
            when ``device`` is not ``cpu`` and CUDA is available, else CPU.
        intra_op_num_threads: threads per operator. Defaults to ONNX Runtime's choice.
        inter_op_num_threads: threads across operators. Defaults to ONNX Runtime's choice.
        graph_optimization_level: ``disable|basic|extended|all``. Defaults to ``all``
            (``basic`` for FP8 graphs on ONNX Runtime < 1.32).
        cpu_int8_u8_activations: on the CPU, run INT8 bundles with uint8 activation Q/DQ (an
            exact re-encoding, see :func:`_u8_activation_bytes`) so the x86 integer kernels
            are used. Defaults to True.
    """

    name = "onnxruntime"
    OPTIONS = {
        "providers": Option(list | tuple, "a list of provider names or (name, options) pairs, "
                            "e.g. ['CPUExecutionProvider']", check=_provider_list),
        "intra_op_num_threads": Option(int, "an int >= 0 (0: ONNX Runtime's choice)", check=_threads),
        "inter_op_num_threads": Option(int, "an int >= 0 (0: ONNX Runtime's choice)", check=_threads),
        "graph_optimization_level": Option(str, "disable, basic, extended or all", choices=_OPT_LEVELS),
        "cpu_int8_u8_activations": Option(bool, "true or false"),
    }

    def _load(self) -> None:
        ort = require("onnxruntime")
        model = self.path if self.path.is_file() else self.path / "model.onnx"
        if not model.is_file():
            raise ArtifactError(fmt("onnx model", f"no file at {model}", "a bundle with model.onnx"))
        directory = model.parent
        self.manifest = read_manifest(directory) if (directory / MANIFEST).is_file() else {}
        check_manifest_types(self.manifest, directory / MANIFEST)
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
        providers = self._providers(ort)
        source: str | bytes = str(model)
        self.rewritten = False
        on_cpu = providers[0] == "CPUExecutionProvider"
        if self.precision == "int8" and on_cpu and self.options.get("cpu_int8_u8_activations", True):
            source = _u8_activation_bytes(model) or source
            self.rewritten = not isinstance(source, str)
        try:
            self.session = ort.InferenceSession(source, sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own exception types (InvalidGraph, Fail, ...)
            raise ArtifactError(fmt(str(model), f"ONNX Runtime could not load it ({str(exc)[:300]})",
                                    "a bundle written by nvembed-export with this SDK")) from exc
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if sorted(names_in) != sorted(INPUT_NAMES) or OUTPUT_NAME not in names_out:
            raise ArtifactError(fmt(str(model), f"inputs {names_in}, outputs {names_out}",
                                    f"inputs {list(INPUT_NAMES)} and output {OUTPUT_NAME!r}"))
        if not self.dim:
            shape = self.session.get_outputs()[0].shape
            self.dim = int(shape[-1]) if isinstance(shape[-1], int) else 0
        used = self.session.get_providers()[0]
        self.device = "cuda" if used == "CUDAExecutionProvider" else "cpu"
        self.emulated = self.precision == "fp8" and self.device == "cpu"
        self.opt_level = level
        if self.emulated:
            log.info("FP8 Q/DQ graph emulated on the CPU (E4M3 rounding at each Q/DQ pair); "
                     "native FP8 needs TensorRT on compute capability >= 8.9")

    def _providers(self, ort: Any) -> list[Any]:
        explicit = self.options.get("providers")
        available = ort.get_available_providers()
        if explicit:
            missing = [p if isinstance(p, str) else p[0] for p in explicit
                       if (p if isinstance(p, str) else p[0]) not in available]
            if missing:
                raise BackendUnavailableError(fmt("onnxruntime providers", f"{missing} not available",
                                                  f"available here: {available}"))
            return list(explicit)
        device = self.requested_device or "auto"
        if device == "cpu":
            return ["CPUExecutionProvider"]
        wants_cuda = device.startswith("cuda")
        if "CUDAExecutionProvider" in available and _cuda_usable():
            dev_id = int(device.split(":")[1]) if ":" in device else 0
            return [("CUDAExecutionProvider", {"device_id": dev_id}), "CPUExecutionProvider"]
        if wants_cuda:
            raise BackendUnavailableError(fmt("device", repr(device),
                                              "CUDA is not usable by onnxruntime here (needs onnxruntime-gpu, "
                                              "a GPU and CUDA/cuDNN libraries); use device='cpu'"))
        log.warning("onnxruntime: CUDA not available, running %s on the CPU", self.path.name)
        return ["CPUExecutionProvider"]

    def _run(self, batch: Batch) -> np.ndarray:
        feeds = batch.as_dict()
        if self.device == "cuda":
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
