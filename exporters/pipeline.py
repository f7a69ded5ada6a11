"""``export(...)``: checkpoint (or ONNX bundle) -> ONNX bundle or TensorRT engine bundle.

The one pipeline behind ``nvembed-export`` (the CLI only parses options). Order:

1. :func:`~nvembed_sdk.exporters.plan.make_plan` (pure): impossible precision / runtime /
   target / typing combinations fail in milliseconds;
2. ``--to tensorrt``: :func:`~nvembed_sdk.exporters.trt_build.preflight` (TensorRT import, GPU,
   compute capability), then the plan again with the TensorRT major (bf16 or weak typing on
   TensorRT 11 fail here), still before any model is loaded;
3. the ONNX bundle (:func:`write_onnx_bundle`), unless ``model`` already is one;
4. the engine bundle (:func:`write_engine_bundle`).

Bundle writing stays in steps 3 and 4 so staging and overwrite rules have one place to go.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nvembed_sdk.exporters.plan import Plan, make_plan
from nvembed_sdk.exporters.targets import QDQ_PRECISIONS
from nvembed_sdk.manifest import MANIFEST, read_manifest

log = logging.getLogger("nvembed_sdk.export")


def _onnx_source(model: str | Path) -> dict[str, Any] | None:
    p = Path(model)
    if (p / MANIFEST).is_file():
        m = read_manifest(p)
        if m.get("kind") == "onnx":
            return m
    return None


def check_export(to: str, precision: str, model: str | Path | None = None, runtime: str | None = None,
                 target: str = "datacenter", strongly_typed: bool | None = None, opset: int | None = None,
                 calibration: str | Path | None = None, calibration_size: int | None = None,
                 max_length: int | None = None, fp8_attention: bool | None = None) -> Plan:
    """Every check that needs neither a model nor TensorRT; returns the plan. Instant."""
    from nvembed_sdk.errors import InputError, fmt
    from nvembed_sdk.validate import check_export_sizes, check_opset

    check_opset(opset)  # --opset 99: refused before any slow work
    check_export_sizes(max_length, calibration_size, model)
    source = _onnx_source(model) if (model is not None and to == "tensorrt") else None
    plan = make_plan(to, precision, runtime=runtime, target=target, strongly_typed=strongly_typed, opset=opset,
                     source=source)
    quantised = plan.onnx_precision in QDQ_PRECISIONS and source is None
    if not quantised and (calibration is not None or calibration_size is not None):
        raise InputError(fmt("--calibration/--calibration-size", f"--precision {precision}",
                             "calibration is for int8/fp8 exports from a checkpoint; drop it"))
    if fp8_attention and not (plan.onnx_precision == "fp8" and source is None):
        got = "an ONNX bundle as --model" if source is not None else f"--precision {precision} --runtime {plan.runtime}"
        raise InputError(fmt("--fp8-attention", got, "FP8 attention BMMs are for --precision fp8 graphs for "
                             "TensorRT (--runtime tensorrt) exported from a checkpoint"))
    return plan


def export(
    model: str | Path,
    output: str | Path,
    to: str = "onnx",
    precision: str = "fp32",
    runtime: str | None = None,
    opset: int | None = None,
    max_length: int | None = None,
    validate: bool = True,
    calibration: str | Path | None = None,
    calibration_size: int | None = None,
    force: bool = False,
    fallback: bool = True,
    fp8_attention: bool | None = None,
    target: str = "datacenter",
    profiles: Iterable[str] | None = None,
    workspace_gb: float | None = None,
    opt_level: int = 3,
    timing_cache: str | Path | bool | None = None,
    strongly_typed: bool | None = None,
    device: str | None = None,
    verbose: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export a checkpoint to an ONNX bundle or a TensorRT engine bundle.

    Args:
        model: checkpoint directory, or (``to="tensorrt"``) an ONNX bundle to build from.
        output: bundle directory to write.
        to: ``onnx`` or ``tensorrt``. Defaults to onnx.
        precision: ``fp32``, ``fp16``, ``bf16`` (TensorRT 10.x only), ``int8`` or ``fp8``.
            Defaults to fp32.
        runtime: ONNX int8/fp8: ``onnxruntime`` (fp32 base, ONNX Runtime's integer kernels) or
            ``tensorrt`` (fp16 base around the Q/DQ GEMMs). Defaults to onnxruntime for int8,
            tensorrt for fp8; engines always use the TensorRT graph.
        opset: ONNX opset. Defaults to the plan's (20; 21 for fp8).
        max_length: text max length recorded in the bundle. Defaults to the checkpoint's.
        validate: check against PyTorch fp32 and fail outside the budget. Defaults to True.
        calibration: int8/fp8 calibration texts. Defaults to the shipped set.
        calibration_size: number of calibration texts. Defaults to 256.
        force: keep a quantised bundle outside the budget. Defaults to False.
        fallback: int8/fp8: keep the fewest sensitive projections in high precision when the
            budget is missed. Defaults to True.
        fp8_attention: fp8 for TensorRT: FP8 Q/DQ on the attention BMMs. Defaults to None (on
            when the calibration error stays within budget).
        target: TensorRT deployment target. Defaults to datacenter.
        profiles: TensorRT ``--profile`` strings. Defaults to the target's.
        workspace_gb: TensorRT workspace in GiB. Defaults to the target's.
        opt_level: TensorRT builder optimisation level. Defaults to 3.
        timing_cache: TensorRT timing cache path, or False for none. Defaults to a per-GPU file.
        strongly_typed: TensorRT 10.x network typing. Defaults to None (auto).
        device: TensorRT build GPU. Defaults to the current CUDA device.
        verbose: verbose TensorRT log. Defaults to False.
        overwrite: replace an existing bundle of this SDK at ``output`` (swapped in only once the
            new one is complete). Defaults to False.

    Returns:
        The bundle directory.

    Raises:
        InputError: an impossible combination (before any export work).
        BackendUnavailableError: onnx / onnxruntime / modelopt / tensorrt / CUDA missing.
        ToleranceExceeded: a quantised export outside the budget (with the sensitivity report).
    """
    from nvembed_sdk.errors import InputError, fmt
    from nvembed_sdk.exporters.staging import check_target, staged_output

    plan = check_export(to, precision, model, runtime, target, strongly_typed, opset, calibration, calibration_size,
                        max_length, fp8_attention)
    if Path(output).resolve() == Path(model).resolve():
        raise InputError(fmt("--output", str(output), "a directory other than the --model it is exported from"))
    check_target(output, overwrite)  # a foreign or existing target is refused before any slow work
    from nvembed_sdk.progress import Phases

    if to == "onnx":
        quantised = plan.onnx_precision in QDQ_PRECISIONS  # export_quantized prints its own phases
        with staged_output(output, overwrite=overwrite) as stage, (
                contextlib.nullcontext() if quantised else
                Phases(f"export {precision}", total=1).phase("trace to ONNX" + (" and validate" if validate else ""))):
            write_onnx_bundle(model, stage, plan, max_length=max_length, validate=validate,
                              calibration=calibration, calibration_size=calibration_size, force=force,
                              fallback=fallback, fp8_attention=fp8_attention)
        return Path(output)
    from nvembed_sdk.exporters.trt_build import preflight

    env = preflight(precision, target, device)
    source = _onnx_source(model)
    plan = make_plan(to, precision, target=target, trt_major=env.trt_major, strongly_typed=strongly_typed,
                     opset=opset or (None if source else env.target.opset_for(precision)), source=source)
    with staged_output(output, overwrite=overwrite) as stage:  # onnx/ + engine.plan move in together
        phases = Phases(f"export tensorrt {precision}", total=1 if source is not None else 2)
        if source is not None:
            onnx_dir = Path(model)
        else:
            with phases.phase(f"ONNX bundle ({plan.onnx_precision})"):
                onnx_dir = write_onnx_bundle(model, stage / "onnx", plan, max_length=max_length, validate=validate,
                                             calibration=calibration, calibration_size=calibration_size, force=force,
                                             fallback=fallback, fp8_attention=fp8_attention)
        with phases.phase("TensorRT engine build"):
            write_engine_bundle(onnx_dir, stage, precision=precision, target=target, profiles=profiles,
                                workspace_gb=workspace_gb, opt_level=opt_level, timing_cache=timing_cache,
                                strongly_typed=strongly_typed, device=device, verbose=verbose)
    return Path(output)


def write_onnx_bundle(model: str | Path, output: str | Path, plan: Plan, max_length: int | None = None,
                      validate: bool = True, calibration: str | Path | None = None,
                      calibration_size: int | None = None, force: bool = False, fallback: bool = True,
                      fp8_attention: bool | None = None) -> Path:
    """Step 3: the ONNX bundle of ``plan`` (plain fp32/fp16, or quantised for its runtime)."""
    if not validate:
        log.warning("--no-validate: the export is NOT checked against PyTorch")
    if plan.onnx_precision in QDQ_PRECISIONS:
        from nvembed_sdk.exporters.quantize import export_quantized

        return export_quantized(model, output, precision=plan.onnx_precision, runtime=plan.runtime,
                                calibration=calibration, calibration_size=calibration_size, opset=plan.opset,
                                max_length=max_length, validate=validate, force=force, fallback=fallback,
                                fp8_attention=fp8_attention)
    from nvembed_sdk.exporters.onnx_export import export_onnx
    from nvembed_sdk.manifest import write_manifest

    out = export_onnx(model, output, precision=plan.onnx_precision, opset=plan.opset, validate=validate,
                      max_length=max_length, warn_unvalidated=False)
    manifest = read_manifest(out)
    manifest.pop("format_version", None)
    manifest["plan"] = make_plan("onnx", plan.onnx_precision, opset=plan.opset).to_dict()
    write_manifest(out, manifest)
    return out


def write_engine_bundle(onnx_dir: str | Path, output: str | Path, **build: Any) -> Path:
    """Step 4: the TensorRT engine bundle built from an ONNX bundle."""
    from nvembed_sdk.exporters.trt_build import build_engine

    profiles = build.pop("profiles", None)
    return build_engine(onnx_dir, output, profiles=list(profiles) if profiles else None, **build)
