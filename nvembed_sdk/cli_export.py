"""``nvembed export`` / ``nvembed-export``: parses options and calls :func:`nvembed_sdk.exporters.pipeline.export`."""

from __future__ import annotations

import click

from nvembed_sdk.cli import fail_cleanly

PRECISIONS = ["fp32", "fp16", "bf16", "int8", "fp8"]


@click.command("export")
@click.option("--model", "model", required=True, type=click.Path(), help="Checkpoint directory (released NV-Embed layout).")
@click.option("--to", "to", required=True, type=click.Choice(["onnx", "tensorrt"]), help="Artifact kind.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS),
              help="onnx: fp32|fp16|int8|fp8 (int8/fp8 = explicit Q/DQ). tensorrt: fp32|fp16|bf16 (TensorRT 10.x)"
                   "|int8|fp8.")
@click.option("--runtime", default=None, type=click.Choice(["onnxruntime", "tensorrt"]),
              help="--to onnx int8/fp8: the runtime the graph is made for. onnxruntime: fp32 base (ONNX Runtime "
                   "CPU integer kernels); tensorrt: fp16 base around the Q/DQ GEMMs. Default: onnxruntime for "
                   "int8, tensorrt for fp8.")
@click.option("--output", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing bundle at --output (swapped in only once the new one is complete).")
@click.option("--opset", type=int, default=None, help="ONNX opset. Default: 20 (fp32/fp16/int8), 21 (fp8).")
@click.option("--max-length", type=int, default=None, help="Text max length recorded in the bundle. Default: the checkpoint's.")
@click.option("--no-validate", is_flag=True, help="Skip the parity check against PyTorch fp32 (NOT recommended).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), default=None,
              help="int8/fp8: calibration texts (.txt one per line, or .jsonl[.gz] with 'text'). Default: shipped set.")
@click.option("--calibration-size", type=int, default=None, help="int8/fp8: number of calibration texts. Default: 256.")
@click.option("--force", is_flag=True, help="int8/fp8: keep a bundle whose accuracy report is outside the budget.")
@click.option("--no-fallback", is_flag=True,
              help="int8/fp8: when the budget is missed, fail with the sensitivity report instead of keeping the "
                   "fewest costly projections in high precision.")
@click.option("--fp8-attention/--no-fp8-attention", "fp8_attention", default=None,
              help="fp8 for TensorRT: FP8 Q/DQ on the attention BMMs (QK^T, PV). Default: on when it stays "
                   "within budget on the calibration texts.")
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
def export(model: str, to: str, precision: str, runtime: str | None, output: str, opset: int | None,
           max_length: int | None, no_validate: bool, calibration: str | None, calibration_size: int | None,
           force: bool, no_fallback: bool, fp8_attention: bool | None, target: str, profiles: tuple[str, ...],
           workspace_gb: float | None, opt_level: int, timing_cache: str | None, no_timing_cache: bool,
           strongly_typed: bool | None, device: str | None, verbose: bool,
           overwrite: bool) -> None:
    """Export an NV-Embed checkpoint to an ONNX bundle or a TensorRT engine bundle.

    \b
    Examples:
      nvembed-export --model models/nvembed-debian-small --to onnx --precision fp32 --output out/onnx
      nvembed-export --model DIR --to onnx --precision int8 --calibration texts.txt --output out/int8
      nvembed-export --model DIR --to onnx --precision int8 --runtime tensorrt --output out/int8-trt
      nvembed-export --model DIR --to tensorrt --precision fp8 --output out/trt-fp8
      nvembed-export --model out/int8-trt --to tensorrt --precision int8 --target jetson-orin --output out/orin

    --model may also be an ONNX bundle when --to tensorrt (build on the device from a copied
    bundle: engines are tied to the GPU model and TensorRT version that built them).
    bf16 engines are built from the fp32 ONNX with TensorRT 10.x's BF16 flag.
    Impossible combinations (bf16 or --weakly-typed on TensorRT 11, fp8 on jetson-orin, fp8 for
    ONNX Runtime) are refused before any export work.

    Every ONNX export is validated against PyTorch fp32 on real text at untraced shapes and fails
    outside the README budget (report stored in nvembed.json).

    The bundle is written in a staging directory beside --output and moved there only when
    complete and validated; --output must be new, empty, or a bundle (with --overwrite).
    """
    from nvembed_sdk.exporters.pipeline import export as run_export

    if no_validate:
        click.echo("warning: --no-validate: the export is NOT checked against PyTorch", err=True)
    path = run_export(model, output, to=to, precision=precision, runtime=runtime, opset=opset, max_length=max_length,
                      validate=not no_validate, calibration=calibration, calibration_size=calibration_size,
                      force=force, fallback=not no_fallback, fp8_attention=fp8_attention, target=target,
                      profiles=profiles, workspace_gb=workspace_gb, opt_level=opt_level,
                      timing_cache=False if no_timing_cache else timing_cache, strongly_typed=strongly_typed,
                      device=device, verbose=verbose, overwrite=overwrite)
    click.echo(f"wrote {path}")
    if to == "onnx":
        _echo_validation(path)


def _echo_validation(bundle: object) -> None:
    from nvembed_sdk.manifest import read_manifest

    m = read_manifest(bundle)  # type: ignore[arg-type]
    fb = m.get("quantization", {}).get("fallback", {})
    if fb.get("kept_high_precision"):
        click.echo(f"fallback: kept {', '.join(fb['kept_high_precision'])} in {fb['dtype']} to stay within budget")
    v = m.get("validation", {})
    if v.get("skipped"):
        return
    if v:
        click.echo(f"validation: min per-row cosine {v['min_cosine']:.7f}, top-{v['k']} agreement "
                   f"{v['topk_agreement']:.3f} vs PyTorch fp32 ({'PASS' if v['passed'] else 'FAIL'})")
