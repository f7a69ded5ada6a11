"""INT8 / FP8 explicit-Q/DQ bundles with NVIDIA ModelOpt's ONNX PTQ, calibrated on real text.

TensorRT 10.1+ deprecated (and 11 removed) implicit INT8 calibration and the precision builder
flags: precision comes from the graph. So the product here is a quantised ONNX bundle:

* the fp32 graph is exported at the target opset (20 for INT8, Orin's TensorRT 10.3 parses it;
  21 for FP8), so ModelOpt never converts opsets (its converter drops the ``nvembed`` domain);
* calibration batches come from the SDK's own text pipeline: queries with the NV-Embed
  instruction and passages without, sorted by length so batches cover short to long;
* only the weight MatMul/Gemm (q/k/v/o, gate/up/down projections) get Q/DQ (INT8 per-channel
  weights, per-tensor activations; FP8 E4M3 per-tensor). Attention BMMs, RMSNorm, softmax,
  residual adds and the whole ``nvembed::LatentAttentionPool``
  head (LayerNorms, latent attention, pooling, normalisation) stay fp32: the head's local
  function lets ONNX Runtime inline it during calibration on a CPU, and the node gets no Q/DQ;
* the accuracy report against fp32 PyTorch on held-out text goes into ``nvembed.json``; outside
  the DESIGN.md budget the export fails unless ``force``.

Memory: ModelOpt loads the model several times and runs an augmented graph; a 7B model needs
the GPU host (128 GiB RAM), not a 24 GiB CPU box.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk._optional import require
from nvembed_sdk.config import NVEmbedConfig
from nvembed_sdk.embedder import DEFAULT_TASK, query_instruction
from nvembed_sdk.errors import InputError, fmt
from nvembed_sdk.exporters.staging import final_path, staged
from nvembed_sdk.manifest import read_manifest, write_manifest
from nvembed_sdk.text import Batch, TextPipeline
from nvembed_sdk.textsets import default_texts, read_texts

log = logging.getLogger("nvembed_sdk.quantize")

QUANT_PRECISIONS = ("int8", "fp8")
DEFAULT_OPSETS = {"int8": 20, "fp8": 21}
DEFAULT_CALIBRATION_SIZE = 256
CALIBRATION_MAX_LENGTH = 512
QUANTIZED_OP_TYPES = ["MatMul", "Gemm"]
HEAD_NODE_PATTERN = r".*nvembed_head.*"
SMOOTH_ALPHA = 0.5


def calibration_batches(
    pipe: TextPipeline,
    texts: Sequence[str],
    query_texts: Sequence[str] = (),
    instruction: str | None = None,
    batch_size: int = 8,
    max_length: int = CALIBRATION_MAX_LENGTH,
) -> list[Batch]:
    """Calibration batches through the shared text pipeline.

    Passages go in without an instruction and queries with ``"Instruct: {task}\\nQuery: "``,
    so the activation ranges of both paths are covered. Rows are sorted by token length before
    batching, so batches span short to long sequences with little padding.
    """
    ins = query_instruction(DEFAULT_TASK) if instruction is None else instruction
    rows: list[tuple[list[int], int]] = [(ids, 0) for ids in pipe.tokenize(list(texts), "", max_length)]
    if query_texts:
        start = pipe.instruction_length(ins)
        rows += [(ids, start) for ids in pipe.tokenize(list(query_texts), ins, max_length)]
    rows.sort(key=lambda r: len(r[0]))
    return [pipe.collate([r[0] for r in rows[i : i + batch_size]], [r[1] for r in rows[i : i + batch_size]])
            for i in range(0, len(rows), batch_size)]


def smooth_mlp_down_inputs(model: Any, batches: Sequence[Batch], alpha: float = SMOOTH_ALPHA) -> list[float]:
    """SmoothQuant on each decoder MLP's ``down_proj`` input, folded exactly into the weights.

    The input of ``down_proj`` is ``silu(gate(x)) * up(x)`` (B, T, I): a few of its I channels
    carry values far above the rest, and one per-tensor static INT8 scale then leaves the other
    channels a handful of levels (measured on the shipped model, MLP 1,024: min per-row cosine
    0.985 with every projection INT8, 0.9998 with the four ``down_proj`` kept fp32). With
    ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)`` (Xiao et al., SmoothQuant) channel j of the
    input is divided by s_j and column j of ``down_proj`` multiplied by it. The division is folded
    into row j of ``up_proj``, which is exact because the input is linear in ``up(x)``; the fp32
    model computes the same function and only the INT8 grid changes.

    Args:
        model: fp32 ``NVEmbedModel`` (modified in place).
        batches: calibration batches (the same texts the quantiser calibrates on).
        alpha: migration strength. Defaults to 0.5.

    Returns:
        Per layer, the largest input-channel absmax over the median one before smoothing.
    """
    import torch

    layers = model.decoder.layers
    stats: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def fn(_mod: Any, args: tuple[Any, ...]) -> None:
            amax = args[0].detach().abs().flatten(0, -2).amax(0)  # (I,)
            stats[i] = torch.maximum(stats[i], amax) if i in stats else amax
        return fn

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for b in batches:
                model(*(torch.from_numpy(v) for v in (b.input_ids, b.attention_mask, b.pool_mask)))
    finally:
        for h in handles:
            h.remove()
    spread = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            act = stats[i].clamp(min=1e-5)
            w = layer.mlp.down_proj.weight.abs().amax(0).clamp(min=1e-5)  # (I,) over the D outputs
            s = (act.pow(alpha) / w.pow(1.0 - alpha)).clamp(1e-3, 1e3)
            layer.mlp.up_proj.weight.div_(s[:, None])  # (I, D): row j scaled by 1 / s_j
            layer.mlp.down_proj.weight.mul_(s[None, :])  # (D, I): column j scaled by s_j
            spread.append(float(act.max() / act.median()))
    return spread


def _reader(batches: list[Batch]) -> Any:
    """An ONNX Runtime CalibrationDataReader with ModelOpt's extra ``get_first``/``rewind``."""
    from onnxruntime.quantization import CalibrationDataReader

    class TextCalibrationReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = [b.as_dict() for b in batches]
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(self.feeds):
                return None
            self.i += 1
            return self.feeds[self.i - 1]

        def get_first(self) -> dict[str, np.ndarray]:
            return self.feeds[0]

        def rewind(self) -> None:
            self.i = 0

        def __len__(self) -> int:
            return len(self.feeds)

    return TextCalibrationReader()


def load_calibration_texts(calibration: str | Path | None, size: int) -> tuple[list[str], list[str], str]:
    """(passages, queries, source) from a user file or the shipped calibration split.

    A user file: every text is a passage; texts of at most 32 words are also used as queries.
    """
    if calibration is None:
        passages = default_texts("calibration", kind="passage")
        queries = default_texts("calibration", kind="query")
        source = "nvembed_sdk/data/python-docs-sample.jsonl.gz (calibration split)"
    else:
        texts = read_texts(calibration)
        passages = texts
        queries = [t for t in texts if len(t.split()) <= 32]
        source = str(calibration)
    # Keep the passage/query proportions while capping the total at `size`.
    total = len(passages) + len(queries)
    if size < 8:
        raise InputError(fmt("calibration size", size, "at least 8 texts"))
    if total > size:
        n_q = round(size * len(queries) / total)
        passages, queries = passages[: size - n_q], queries[:n_q]
    return passages, queries, source


class _DropNvmlNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to get GPU count" not in record.getMessage()


def quantize_onnx(
    onnx_path: str | Path,
    output_path: str | Path,
    precision: str,
    batches: list[Batch],
    calibration_method: str = "max",
    eps: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run ModelOpt PTQ on an fp32 ONNX graph; returns a summary of what was quantised.

    Args:
        onnx_path: the fp32 graph (already at the target opset).
        output_path: where the Q/DQ graph goes.
        precision: ``int8`` or ``fp8``.
        batches: calibration batches (:func:`calibration_batches`).
        calibration_method: ``max`` or ``entropy``. Defaults to max.
        eps: ONNX Runtime providers for calibration. Defaults to CUDA when usable, else CPU.
    """
    require("onnxruntime")
    require("modelopt")
    import modelopt.onnx.quantization as moq

    if precision not in QUANT_PRECISIONS:
        raise InputError(fmt("precision", repr(precision), f"one of {QUANT_PRECISIONS}"))
    if eps is None:
        from nvembed_sdk.runtimes.ort import _cuda_usable

        eps = ["cuda:0", "cpu"] if _cuda_usable() else ["cpu"]
    mo_log = logging.getLogger("modelopt.onnx")
    noise = _DropNvmlNoise()
    level = mo_log.level
    mo_log.setLevel(logging.WARNING)
    for handler in [*mo_log.handlers, *logging.getLogger().handlers]:
        handler.addFilter(noise)
    mo_log.addFilter(noise)
    try:
        moq.quantize(
            onnx_path=str(onnx_path), quantize_mode=precision, calibration_data_reader=_reader(batches),
            calibration_method=calibration_method, calibration_eps=list(eps),
            # fp32 keeps the non-quantised graph (and the custom-op head) as is; ModelOpt's fp16
            # AutoCast step needs TensorRT to classify custom ops (tensorrt-modelopt.md §1.2).
            high_precision_dtype="fp32", op_types_to_quantize=QUANTIZED_OP_TYPES,
            nodes_to_exclude=[HEAD_NODE_PATTERN], output_path=str(output_path),
            # Attention BMMs (QK^T, PV) stay fp32: ModelOpt's INT8 MHA Q/DQ collapsed the
            # embeddings (per-row cosine < 0 on a test model) while weight GEMMs alone keep 0.999.
            disable_mha_qdq=True, log_level="WARNING",
            # Weights stored quantised (int8 / float8 initialisers behind DequantizeLinear): a
            # quarter of the fp32 size, and the pattern ONNX Runtime fuses into integer MatMuls.
            dq_only=True,
            use_external_data_format=Path(onnx_path).with_suffix(".onnx.data").exists(),
        )
    finally:
        mo_log.setLevel(level)
        mo_log.removeFilter(noise)
        for handler in [*mo_log.handlers, *logging.getLogger().handlers]:
            handler.removeFilter(noise)
    return summarize_qdq(output_path)


def summarize_qdq(path: str | Path) -> dict[str, Any]:
    """Which MatMul/Gemm nodes read dequantised inputs (quantised) and which stayed high precision."""
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    producer = {out: n for n in model.graph.node for out in n.output}
    quantized, kept = [], []
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            dq = [i for i in n.input if i in producer and producer[i].op_type == "DequantizeLinear"]
            (quantized if dq else kept).append(n.name)
    zero_point_types = set()
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2:
            init = next((t for t in model.graph.initializer if t.name == n.input[2]), None)
            if init is not None:
                zero_point_types.add(onnx.TensorProto.DataType.Name(init.data_type))
    head = [f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain == "nvembed"]
    return {
        "quantized_matmuls": quantized,
        "kept_high_precision": kept + [f"{h} (whole head: LayerNorms, latent attention, pooling, L2 norm)" for h in head]
        + ["RMSNorm (Pow/ReduceMean/Sqrt/Reciprocal/Mul)", "attention QK^T / PV MatMuls and Softmax", "residual Add"],
        "qdq_pairs": sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear"),
        "zero_point_types": sorted(zero_point_types),
    }


@staged("output")  # written beside `output`, moved into place when complete and validated
def export_quantized(
    model: str | Path,
    output: str | Path,
    precision: str = "int8",
    calibration: str | Path | None = None,
    calibration_size: int | None = None,
    opset: int | None = None,
    max_length: int | None = None,
    validate: bool = True,
    force: bool = False,
    calibration_method: str = "max",
    texts: list[str] | None = None,
) -> Path:
    """Export a checkpoint to an INT8 or FP8 explicit-Q/DQ ONNX bundle.

    Args:
        model: checkpoint directory.
        output: bundle directory, written through a staging directory beside it
            (exporters/staging.py). Must be new, empty, or a bundle with ``overwrite``.
        overwrite: replace an existing bundle at ``output`` whole. Defaults to False.
        precision: ``int8`` or ``fp8``. Defaults to int8.
        calibration: calibration texts (.txt or .jsonl[.gz]). Defaults to the shipped set.
        calibration_size: number of calibration texts. Defaults to 256.
        opset: ONNX opset. Defaults to 20 (int8) or 21 (fp8).
        max_length: text max length recorded in the manifest. Defaults to the checkpoint's.
        validate: accuracy report vs fp32 PyTorch on held-out text. Defaults to True.
        force: keep the bundle even when the report is outside the budget. Defaults to False.
        calibration_method: ``max`` or ``entropy``. Defaults to max.
        texts: held-out validation texts. Defaults to the shipped validation split.

    Returns:
        The bundle directory.

    Raises:
        ToleranceExceeded: outside the budget and not ``force``.
        BackendUnavailableError: onnxruntime or modelopt missing.
    """
    from nvembed_sdk.exporters.onnx_export import export_onnx
    from nvembed_sdk.exporters.validate import validate_export

    if precision not in QUANT_PRECISIONS:
        raise InputError(fmt("precision", repr(precision), f"one of {QUANT_PRECISIONS}"))
    require("onnxruntime")
    require("modelopt")
    opset = int(opset or DEFAULT_OPSETS[precision])
    if opset < 19 or (precision == "fp8" and opset < 21):
        raise InputError(fmt("opset", opset, "int8 needs >= 19; fp8 needs >= 21 (ModelOpt FP8 Q/DQ)"))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    size = int(calibration_size or DEFAULT_CALIBRATION_SIZE)
    passages, queries, source = load_calibration_texts(calibration, size)
    # One set of calibration batches, at the length the manifest will record, for both the
    # smoothing statistics (torch, before tracing) and ModelOpt's calibration (ONNX Runtime).
    pipe = TextPipeline(model)
    text_length = max_length or NVEmbedConfig.from_file(model).max_length
    batches = calibration_batches(pipe, passages, queries, max_length=min(CALIBRATION_MAX_LENGTH, text_length))
    smoothing: dict[str, Any] = {}

    def smooth(torch_model: Any) -> None:  # INT8 only: FP8's exponent already spans the outliers
        spread = smooth_mlp_down_inputs(torch_model, batches)
        smoothing.update(method="SmoothQuant on the MLP down_proj inputs, folded into up_proj/down_proj (exact)",
                         alpha=SMOOTH_ALPHA, outlier_ratio_before=[round(x, 1) for x in spread])

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        base = export_onnx(model, Path(tmp) / "fp32", precision="fp32", opset=opset, validate=False,
                           max_length=max_length, warn_unvalidated=False,  # validated after quantisation
                           transform=smooth if precision == "int8" else None)
        manifest = read_manifest(base)
        q_path = Path(tmp) / "model.onnx"
        summary = quantize_onnx(base / "model.onnx", q_path, precision, batches, calibration_method)
        for stale in ("model.onnx", "model.onnx.data"):
            (out / stale).unlink(missing_ok=True)
        files = {"model": "model.onnx"}
        for f in Path(tmp).iterdir():
            if f.is_file() and f.name.startswith("model.onnx"):
                shutil.move(str(f), out / f.name)
                if f.name != "model.onnx":
                    files["data"] = f.name
        pipe.save(out)
    import modelopt
    import onnxruntime

    manifest.pop("format_version", None)
    manifest.pop("validation", None)
    manifest.update(
        precision=precision, opset=opset, files=files,
        quantization={
            "tool": f"nvidia-modelopt {modelopt.__version__} (modelopt.onnx.quantization)",
            "onnxruntime": onnxruntime.__version__, "mode": precision, "method": calibration_method,
            "calibration": {"source": source, "passages": len(passages), "queries": len(queries),
                            "batches": len(batches), "max_length": int(batches[-1].input_ids.shape[1])},
            "weights": "per-channel" if precision == "int8" else "per-tensor",
            "activations": "per-tensor static",
            **({"smoothing": smoothing} if smoothing else {}),
            **summary,
        },
    )
    manifest.setdefault("build", {})["target_hint"] = (
        "TensorRT on any GPU; ONNX Runtime CPU/CUDA" if precision == "int8"
        else "TensorRT on compute capability >= 8.9; ONNX Runtime CPU emulation for validation")
    write_manifest(out, manifest)
    if validate:
        report = validate_export(model, out, texts=texts, raise_on_failure=False)
        if not report and not force:
            report.raise_if_failed()
        if not report:
            log.warning("%s is OUTSIDE the %s budget (kept because of --force):\n%s", final_path(out), precision, report)
    return out
