"""``nvembed export`` / ``nvembed-export``: checkpoint -> ONNX (fp32/fp16/int8/fp8) or TensorRT."""

from __future__ import annotations

import click

from nvembed_sdk.cli import fail_cleanly

PRECISIONS = ["fp32", "fp16", "bf16", "int8", "fp8"]


@click.command("export")
@click.option("--model", "model", required=True, type=click.Path(), help="Checkpoint directory (released NV-Embed layout).")
@click.option("--to", "to", required=True, type=click.Choice(["onnx", "tensorrt"]), help="Artifact kind.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS),
              help="onnx: fp32|fp16|int8|fp8 (int8/fp8 = explicit Q/DQ via NVIDIA ModelOpt). "
                   "tensorrt: fp16|bf16|int8|fp8.")
@click.option("--output", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing bundle at --output (swapped in only once the new one is complete).")
@click.option("--opset", type=int, default=None, help="ONNX opset. Default: 20 (fp32/fp16/int8), 21 (fp8), per target.")
@click.option("--max-length", type=int, default=None, help="Text max length recorded in the bundle. Default: the checkpoint's.")
@click.option("--no-validate", is_flag=True, help="Skip the parity check against PyTorch fp32 (NOT recommended).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), default=None,
              help="int8/fp8: calibration texts (.txt one per line, or .jsonl[.gz] with 'text'). Default: shipped set.")
@click.option("--calibration-size", type=int, default=None, help="int8/fp8: number of calibration texts. Default: 256.")
@click.option("--force", is_flag=True, help="int8/fp8: keep a bundle whose accuracy report is outside the budget.")
@click.option("--target", default="datacenter", show_default=True,
              type=click.Choice(["datacenter", "jetson-orin", "jetson-thor"]), help="tensorrt: deployment target.")
@click.option("--profile", "profiles", multiple=True,
              help="tensorrt: optimisation profile MINBxMINS:OPTBxOPTS:MAXBxMAXS, e.g. 1x16:8x128:32x512 (repeatable).")
@click.option("--workspace-gb", type=float, default=None, help="tensorrt: workspace limit in GiB. Default: per target.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="tensorrt: builder optimisation level.")
@click.option("--timing-cache", type=click.Path(), default=None,
              help="tensorrt: timing cache file (read and updated). Default: a per-GPU file under ~/.cache/nvembed_sdk.")
@click.option("--no-timing-cache", is_flag=True, help="tensorrt: build without a timing cache.")
@click.option("--strongly-typed/--weakly-typed", "strongly_typed", default=None,
              help="tensorrt 10.x: network typing. Default: strongly typed when the ONNX carries the precision "
                   "(TensorRT 11 is always strongly typed).")
@click.option("--device", default=None, help="tensorrt: build GPU, cuda or cuda:N. Default: the current CUDA device.")
@click.option("--verbose", is_flag=True, help="tensorrt: verbose builder log.")
@fail_cleanly
def export(model: str, to: str, precision: str, output: str, overwrite: bool, opset: int | None, max_length: int | None,
           no_validate: bool, calibration: str | None, calibration_size: int | None, force: bool, target: str,
           profiles: tuple[str, ...], workspace_gb: float | None, opt_level: int, timing_cache: str | None,
           no_timing_cache: bool, strongly_typed: bool | None, device: str | None, verbose: bool) -> None:
    """Export an NV-Embed checkpoint to an ONNX bundle or a TensorRT engine bundle.

    \b
    Examples:
      nvembed-export --model models/nvembed-debian-small --to onnx --precision fp32 --output out/onnx
      nvembed-export --model DIR --to onnx --precision int8 --calibration texts.txt --output out/int8
      nvembed-export --model DIR --to tensorrt --precision fp8 --output out/trt-fp8
      nvembed-export --model out/int8 --to tensorrt --precision int8 --target jetson-orin --output out/orin

    --model may also be an ONNX bundle when --to tensorrt (build on the device from a copied
    bundle: engines are tied to the GPU model and TensorRT version that built them).
    bf16 engines are built from the fp32 ONNX with TensorRT 10.x's BF16 flag.

    Every ONNX export is validated against PyTorch fp32 on real text at untraced shapes and fails
    outside the DESIGN.md budget (report stored in nvembed.json).

    The bundle is written in a staging directory beside --output and moved there only when
    complete and validated; --output must be new, empty, or a bundle (with --overwrite).
    """
    from pathlib import Path

    from nvembed_sdk.errors import InputError, fmt

    if to == "onnx":
        if precision == "bf16":
            raise InputError("precision bf16 | got --to onnx. Note: ONNX bundles are fp32, fp16, int8 or fp8; "
                             "bf16 is a TensorRT build precision (--to tensorrt)")
        path = _export_onnx(model, output, precision, opset, max_length, no_validate, calibration,
                            calibration_size, force, overwrite)
        click.echo(f"wrote {path}")
        _echo_validation(path)
        return
    # TensorRT: target, host, TensorRT, GPU and compute capability are checked before any slow
    # work, so a machine without them fails in well under 10 s.
    from nvembed_sdk.exporters.staging import staged_output
    from nvembed_sdk.exporters.trt_build import build_engine, preflight
    from nvembed_sdk.manifest import MANIFEST, read_manifest

    env = preflight(precision, target, device)
    source = Path(model)
    if Path(output).resolve() == source.resolve():
        raise InputError(fmt("--output", output, "a directory other than the --model it is built from"))
    with staged_output(output, overwrite=overwrite) as stage:  # onnx/ + engine.plan move in together
        if (source / MANIFEST).is_file() and read_manifest(source).get("kind") == "onnx":
            onnx_dir = source  # an ONNX bundle: build from it directly
        else:
            onnx_precision = {"fp16": "fp16", "bf16": "fp32", "int8": "int8", "fp8": "fp8"}.get(precision, "fp32")
            onnx_dir = stage / "onnx"
            _export_onnx(model, str(onnx_dir), onnx_precision, opset or env.target.opset_for(precision),
                         max_length, no_validate, calibration, calibration_size, force)
        build_engine(onnx_dir, stage, precision=precision, target=target, profiles=list(profiles) or None,
                     workspace_gb=workspace_gb, opt_level=opt_level,
                     timing_cache=False if no_timing_cache else timing_cache, strongly_typed=strongly_typed,
                     device=device, verbose=verbose)
    click.echo(f"wrote {output}")


def _export_onnx(model: str, output: str, precision: str, opset: int | None, max_length: int | None,
                 no_validate: bool, calibration: str | None, calibration_size: int | None, force: bool,
                 overwrite: bool = False) -> object:
    if no_validate:
        click.echo("warning: --no-validate: the export is NOT checked against PyTorch", err=True)
    if precision in ("int8", "fp8"):
        from nvembed_sdk.exporters.quantize import export_quantized

        return export_quantized(model, output, precision=precision, calibration=calibration,
                                calibration_size=calibration_size, opset=opset, max_length=max_length,
                                validate=not no_validate, force=force, overwrite=overwrite)
    from nvembed_sdk.exporters.onnx_export import export_onnx

    return export_onnx(model, output, precision=precision, opset=opset, validate=not no_validate,
                       max_length=max_length, overwrite=overwrite)


def _echo_validation(bundle: object) -> None:
    from nvembed_sdk.manifest import read_manifest

    v = read_manifest(bundle).get("validation", {})  # type: ignore[arg-type]
    if v.get("skipped"):
        return
    if v:
        click.echo(f"validation: min per-row cosine {v['min_cosine']:.7f}, top-{v['k']} agreement "
                   f"{v['topk_agreement']:.3f} vs PyTorch fp32 ({'PASS' if v['passed'] else 'FAIL'})")
