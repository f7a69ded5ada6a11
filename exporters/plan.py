"""The precision plan: one table from precision x runtime x TensorRT major to how a bundle is made.

Everything the exporters decide about numerics is read from here, nowhere else:

* ``GRAPHS``: (precision, runtime the ONNX is made for) -> base dtype of the graph, ONNX opset
  and Q/DQ placement. A quantised graph meant for TensorRT is fp16 outside the fp32 islands
  (strongly typed builds take every tensor's type from the graph); one meant for ONNX Runtime
  on the CPU keeps an fp32 base, which its integer kernels are fastest with.
* ``BUILDS``: (engine precision, ONNX precision, TensorRT major) -> strong typing and builder
  flags. TensorRT 11 has only strongly typed networks and no precision flags.

:func:`make_plan` is pure and instant: the pipeline calls it before it loads a model, so an
impossible request fails in milliseconds with one line naming what does work. The TensorRT
major is only known once ``tensorrt`` is imported; :func:`make_plan` is then called again with
it, still before any export work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from nvembed_sdk.errors import InputError, fmt
from nvembed_sdk.exporters.targets import PRECISIONS, QDQ_PRECISIONS, check_target

RUNTIMES = ("onnxruntime", "tensorrt")
# The default runtime a quantised ONNX bundle is made for: INT8 runs well on ONNX Runtime's CPU
# integer kernels; FP8 has no ONNX Runtime kernels (CPU only emulates it), so it is for TensorRT.
DEFAULT_RUNTIME = {"int8": "onnxruntime", "fp8": "tensorrt"}

# The tensors a TensorRT-bound quantised graph keeps in fp32 (the README "Precision and parity
# budget"), plus the rotary angle tables (positions x frequencies, (T, head_dim), computed once
# per batch: fp16 angles lose the phase at long positions).
FP32_ISLANDS = ("RMSNorm statistics", "attention scores scale/mask and softmax",
                "head LayerNorms, pooling and final L2 (nvembed::LatentAttentionPool)", "RoPE angle tables")


@dataclass(frozen=True)
class GraphPlan:
    base_dtype: str  # dtype of every float tensor outside the islands and the Q/DQ GEMMs
    opset: int
    qdq: str  # where Q/DQ goes; "" for none
    quantizer: str  # who places it


_GEMMS_INT8 = "decoder q/k/v/o/gate/up/down MatMuls: INT8 per-channel weights, per-tensor static activations"
_GEMMS_FP8 = "decoder q/k/v/o/gate/up/down MatMuls: FP8 E4M3 per-channel weights, per-tensor static activations"

# (precision, runtime) -> graph. runtime None: the graph is the same for every runtime.
GRAPHS: dict[tuple[str, str | None], GraphPlan] = {
    ("fp32", None): GraphPlan("fp32", 20, "", "none"),
    ("fp16", None): GraphPlan("fp16", 20, "", "none"),
    ("int8", "onnxruntime"): GraphPlan("fp32", 20, _GEMMS_INT8, "nvidia-modelopt ONNX PTQ"),
    ("int8", "tensorrt"): GraphPlan("fp16", 20, _GEMMS_INT8, "nvembed-sdk (fp16 trace + Q/DQ)"),
    ("fp8", "tensorrt"): GraphPlan("fp16", 21, _GEMMS_FP8, "nvembed-sdk (fp16 trace + Q/DQ)"),
}

# Engine precision -> the ONNX precision the pipeline exports for it (bf16: fp32 + BF16 flag).
ENGINE_SOURCE = {"fp32": "fp32", "fp16": "fp16", "bf16": "fp32", "int8": "int8", "fp8": "fp8"}


@dataclass(frozen=True)
class Plan:
    """What one export will do; recorded in the manifest under ``plan``.

    Attributes:
        to: ``onnx`` or ``tensorrt``.
        precision: requested precision.
        runtime: the runtime the ONNX graph is made for (``onnxruntime``, ``tensorrt`` or ``any``).
        onnx_precision: precision of the ONNX bundle that is exported (or built from).
        base_dtype: dtype of the graph outside the islands and quantised GEMMs.
        opset: ONNX opset.
        qdq: Q/DQ placement ("" for none).
        quantizer: who places the Q/DQ.
        fp32_islands: tensors kept fp32 in an fp16-base graph.
        trt_major: TensorRT major the engine is built with (None: not known yet / no engine).
        strongly_typed: network typing of the engine build (None: no engine).
        builder_flags: ``trt.BuilderFlag`` names set (10.x weakly typed builds only).
    """

    to: str
    precision: str
    runtime: str
    onnx_precision: str
    base_dtype: str
    opset: int
    qdq: str
    quantizer: str
    fp32_islands: tuple[str, ...] = ()
    trt_major: int | None = None
    strongly_typed: bool | None = None
    builder_flags: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fp32_islands"] = list(self.fp32_islands)
        d["builder_flags"] = list(self.builder_flags)
        return d


def _refuse(subject: str, got: str, works: str) -> InputError:
    return InputError(fmt(subject, got, works))


def graph_plan(precision: str, runtime: str | None) -> tuple[str, GraphPlan]:
    """(runtime, graph) for an ONNX bundle in ``precision``; refuses what cannot work."""
    if precision not in PRECISIONS:
        raise _refuse("--precision", repr(precision), f"one of {', '.join(PRECISIONS)}")
    if runtime is not None and runtime not in RUNTIMES:
        raise _refuse("--runtime", repr(runtime), f"one of {', '.join(RUNTIMES)}")
    if precision == "bf16":
        raise _refuse("--precision bf16", "--to onnx",
                      "ONNX bundles are fp32, fp16, int8 or fp8; bf16 is a TensorRT 10.x build precision "
                      "(--to tensorrt --precision bf16), or use --precision fp16")
    if precision not in QDQ_PRECISIONS:
        return runtime or "any", GRAPHS[(precision, None)]
    runtime = runtime or DEFAULT_RUNTIME[precision]
    if (precision, runtime) not in GRAPHS:  # fp8 for onnxruntime
        raise _refuse(f"--precision {precision} --runtime {runtime}",
                      "ONNX Runtime has no FP8 kernels (its CPU only emulates FP8 Q/DQ)",
                      "use --runtime tensorrt (the default for fp8; ONNX Runtime can still run it, emulated, "
                      "for validation), or --precision int8 --runtime onnxruntime")
    return runtime, GRAPHS[(precision, runtime)]


def plan_precision(requested: str, onnx_precision: str, trt_major: int,
                   strongly_typed: bool | None = None) -> tuple[bool, tuple[str, ...]]:
    """How to get engine precision ``requested`` out of an ONNX in ``onnx_precision`` with this TensorRT.

    Args:
        requested: engine precision.
        onnx_precision: the ONNX bundle's ``precision`` (``int8``/``fp8`` mean Q/DQ).
        trt_major: TensorRT major version (10 or 11).
        strongly_typed: force the network typing; None picks (strong whenever the ONNX
            already carries the precision).

    Returns:
        (strongly typed network, names of ``trt.BuilderFlag`` members to set).

    Raises:
        InputError: the combination cannot be built; the message says which bundle to export.
    """
    export = f"nvembed-export --model CHECKPOINT --to onnx --precision {requested}"
    if trt_major >= 11:
        if strongly_typed is False:
            raise InputError(fmt("--weakly-typed", f"TensorRT {trt_major}",
                                 "TensorRT 11 networks are always strongly typed; drop --weakly-typed"))
        if requested == "bf16":
            raise InputError(fmt("--precision bf16", f"TensorRT {trt_major}",
                                 "bf16 engines need TensorRT 10.x's BF16 builder flag (TensorRT 11 has no precision "
                                 "flags and the SDK exports no bf16 ONNX); use --precision fp16, int8 or fp8"))
        if requested != onnx_precision:
            raise InputError(fmt(
                f"--precision {requested}", f"a {onnx_precision} ONNX bundle with TensorRT {trt_major}",
                f"TensorRT 11 takes the precision from the ONNX (no builder flags); build from a {requested} "
                f"bundle: {export}"))
        return True, ()
    if requested in QDQ_PRECISIONS:
        if onnx_precision != requested:
            raise InputError(fmt(
                f"--precision {requested}", f"a {onnx_precision} ONNX bundle (no {requested.upper()} Q/DQ)",
                f"INT8/FP8 engines are built from a quantised Q/DQ bundle (the builder never calibrates): {export}"))
        if strongly_typed is False:
            return False, (requested.upper(), "FP16")
        return True, ()
    if requested == onnx_precision:
        if strongly_typed is False and requested in ("fp16", "bf16"):
            return False, (requested.upper(),)  # weak typing computes in fp32 unless the flag allows fp16
        return (strongly_typed is not False), ()
    if onnx_precision == "fp32" and requested in ("fp16", "bf16"):
        if strongly_typed:
            raise InputError(fmt(f"--precision {requested} with strongly_typed=True", "an fp32 ONNX bundle",
                                 f"a strongly typed build keeps the ONNX's types; {export}"))
        return False, (requested.upper(),)
    raise InputError(fmt(f"--precision {requested}", f"a {onnx_precision} ONNX bundle",
                         f"an fp32 or {requested} bundle: {export}"))


def make_plan(
    to: str,
    precision: str,
    runtime: str | None = None,
    target: str = "datacenter",
    trt_major: int | None = None,
    strongly_typed: bool | None = None,
    opset: int | None = None,
    source: dict[str, Any] | None = None,
) -> Plan:
    """The plan for one export, or one-line :class:`InputError` naming what works instead.

    Args:
        to: ``onnx`` or ``tensorrt``.
        precision: ``fp32``, ``fp16``, ``bf16``, ``int8`` or ``fp8``.
        runtime: ``--to onnx`` with int8/fp8: the runtime the graph is for. Defaults to
            onnxruntime for int8, tensorrt for fp8 (``--to tensorrt`` always means tensorrt).
        target: ``--to tensorrt`` deployment target. Defaults to datacenter.
        trt_major: TensorRT major of the build host, once known. Defaults to None.
        strongly_typed: ``--strongly-typed/--weakly-typed`` (TensorRT only). Defaults to None (auto).
        opset: an explicit ``--opset``. Defaults to the table's.
        source: manifest of an ONNX bundle an engine is built from. Defaults to None (the
            pipeline exports the ONNX).

    Returns:
        The :class:`Plan`.

    Raises:
        InputError: the combination can never work.
    """
    if to not in ("onnx", "tensorrt"):
        raise _refuse("--to", repr(to), "onnx or tensorrt")
    if to == "onnx":
        if strongly_typed is not None:
            raise _refuse("--strongly-typed/--weakly-typed", "--to onnx",
                          "network typing is a TensorRT build setting; use it with --to tensorrt")
        rt, g = graph_plan(precision, runtime)
        return Plan(to, precision, rt, precision, g.base_dtype, _opset(opset, g, precision), g.qdq, g.quantizer,
                    FP32_ISLANDS if g.base_dtype == "fp16" and g.qdq else ())
    if runtime not in (None, "tensorrt"):
        raise _refuse(f"--runtime {runtime}", "--to tensorrt",
                      "an engine always runs on TensorRT; for an ONNX Runtime bundle use --to onnx --runtime "
                      f"{runtime}")
    check_target(target, precision)
    onnx_precision = ENGINE_SOURCE[precision]
    if source is not None:
        onnx_precision = str(source.get("precision", "fp32"))
        made_for = (source.get("plan") or {}).get("runtime")
        if onnx_precision in QDQ_PRECISIONS and made_for != "tensorrt":
            raise _refuse(f"--model (a {onnx_precision} ONNX bundle)",
                          f"a graph made for {made_for or 'onnxruntime (fp32 base)'}",
                          f"TensorRT needs the fp16-base Q/DQ graph: nvembed-export --to onnx --precision "
                          f"{onnx_precision} --runtime tensorrt, or --to tensorrt from the checkpoint")
    g = GRAPHS.get((onnx_precision, "tensorrt")) or GRAPHS[(onnx_precision, None)]
    typed, flags = (None, ())
    if trt_major is not None:
        typed, flags = plan_precision(precision, onnx_precision, trt_major, strongly_typed)
    return Plan(to, precision, "tensorrt", onnx_precision, g.base_dtype, _opset(opset, g, onnx_precision), g.qdq,
                g.quantizer, FP32_ISLANDS if g.base_dtype == "fp16" and g.qdq else (), trt_major, typed, flags)


def _opset(opset: int | None, g: GraphPlan, precision: str) -> int:
    if opset is None:
        return g.opset
    if opset < 18 or (precision in QDQ_PRECISIONS and opset < 19) or (precision == "fp8" and opset < 21):
        raise _refuse("--opset", str(opset), "fp32/fp16 need >= 18, int8 >= 19, fp8 >= 21 (FP8 Q/DQ)")
    return int(opset)
