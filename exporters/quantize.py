"""INT8 / FP8 explicit-Q/DQ bundles, calibrated on real text, one graph per runtime target.

TensorRT 10.1+ deprecated (and 11 removed) implicit INT8 calibration and the precision builder
flags: precision comes from the graph. So the product here is a quantised ONNX bundle, made for
the runtime the precision plan (exporters/plan.py) names:

* ``runtime="onnxruntime"`` (INT8 default): the fp32 graph with ModelOpt ONNX PTQ Q/DQ, the
  form ONNX Runtime's CPU integer kernels are fastest on;
* ``runtime="tensorrt"`` (FP8 default, and every engine): the fp16 graph with its fp32 islands
  (RMSNorm statistics, scores/softmax, RoPE tables, the head) and SDK-placed Q/DQ
  (exporters/qdq.py), what a strongly typed TensorRT build needs;
* the graph is exported at the target opset (20 for INT8, Orin's TensorRT 10.3 parses it;
  21 for FP8), so ModelOpt never converts opsets (its converter drops the ``nvembed`` domain);
* calibration batches come from the SDK's own text pipeline: queries with the NV-Embed
  instruction and passages without, sorted by length so batches cover short to long;
* only the decoder projection MatMuls (q/k/v/o, gate/up/down) get Q/DQ: per-channel (per output
  channel) weight scales and per-tensor static activation scales, INT8 or FP8 E4M3. Attention
  BMMs, RMSNorm, softmax, residual adds and the ``nvembed::LatentAttentionPool`` head get none;
* INT8 smooths every projection input first and, when a fake-quantised pass misses the budget,
  keeps the fewest costly projections in high precision (exporters/smooth.py);
* the accuracy report against fp32 PyTorch on held-out text goes into ``nvembed.json``; outside
  the README budget the export fails (with the sensitivity ranking) unless ``force``.

Memory: ModelOpt loads the model several times and runs an augmented graph; a 7B model needs
the GPU host (128 GiB RAM), not a 24 GiB CPU box.
"""

from __future__ import annotations

import copy
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
from nvembed_sdk.integrations.st_files import write_st_files
from nvembed_sdk.manifest import read_manifest, write_manifest
from nvembed_sdk.parity import tolerance_for
from nvembed_sdk.progress import Phases
from nvembed_sdk.text import Batch, TextPipeline
from nvembed_sdk.textsets import check_calibration_texts, default_texts, read_texts

log = logging.getLogger("nvembed_sdk.quantize")

QUANT_PRECISIONS = ("int8", "fp8")
DEFAULT_OPSETS = {"int8": 20, "fp8": 21}
DEFAULT_CALIBRATION_SIZE = 256
CALIBRATION_MAX_LENGTH = 512
QUANTIZED_OP_TYPES = ["MatMul", "Gemm"]
HEAD_NODE_PATTERN = r".*nvembed_head.*"
SMOOTH_ALPHA = 0.5
# FP8 attention BMMs stay on when the real graph (ONNX Runtime) on held-out calibration text is
# this far above the budget: the validation texts are other texts (their min spread ~0.002 here).
FP8_ATTENTION_MARGIN = 0.003
FP8_MHA_HEAD_DIMS = (8, 256)  # head sizes TensorRT's FP8 fMHA kernels take: (8, 256] (ModelOpt's rule)


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
        texts = check_calibration_texts(read_texts(calibration), calibration)
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
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Run ModelOpt PTQ on an fp32 ONNX graph; returns a summary of what was quantised.

    Args:
        onnx_path: the fp32 graph (already at the target opset).
        output_path: where the Q/DQ graph goes.
        precision: ``int8`` or ``fp8``.
        batches: calibration batches (:func:`calibration_batches`).
        calibration_method: ``max`` or ``entropy``. Defaults to max.
        eps: ONNX Runtime providers for calibration. Defaults to CUDA when usable, else CPU.
        exclude: node-name regexes kept in high precision (the sensitivity fallback). Defaults to none.
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
            nodes_to_exclude=[HEAD_NODE_PATTERN, *exclude], output_path=str(output_path),
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


# The simulated min cosine (held-out calibration text, fp32 base) must clear the budget by this much:
# measured, the fp16-base ONNX Runtime run on held-out text sat 0.005 (shipped model) to 0.007 (a
# tiny random model) below the simulation.
SIMULATED_MARGIN = 0.008


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
    runtime: str | None = None,
    fallback: bool = True,
    fp8_attention: bool | None = None,
) -> Path:
    """Export a checkpoint to an INT8 or FP8 explicit-Q/DQ ONNX bundle for one runtime.

    ``runtime="onnxruntime"`` (int8 default): fp32 graph, Q/DQ by ModelOpt ONNX PTQ (ONNX
    Runtime's CPU integer kernels are fastest on it). ``runtime="tensorrt"`` (fp8 default): the
    fp16 graph with fp32 islands and Q/DQ on the decoder GEMMs (:mod:`exporters.qdq`), what a
    strongly typed TensorRT build needs. INT8 first smooths every decoder projection input
    (:func:`~nvembed_sdk.exporters.smooth.smooth_decoder`). When a fake-quantised forward pass
    on the calibration text misses the budget, the projections are ranked by cost and, with
    ``fallback``, the fewest of them that bring it back are kept in high precision.

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
        calibration_method: ``max`` or ``entropy`` (ModelOpt, onnxruntime graphs). Defaults to max.
        texts: held-out validation texts. Defaults to the shipped validation split.
        runtime: ``onnxruntime`` or ``tensorrt``. Defaults to the plan's (int8: onnxruntime, fp8: tensorrt).
        fallback: keep the costliest projections in high precision when the budget is missed.
            Defaults to True.
        fp8_attention: fp8 for TensorRT: FP8 Q/DQ on the attention BMMs (Q, K, softmax output,
            V), in TensorRT's FP8 attention layout. None: on when the held-out simulation against
            fp32 stays within budget; True: on, refused (InputError) over budget or for other
            precisions/runtimes; False: off. Defaults to None.

    Returns:
        The bundle directory.

    Raises:
        ToleranceExceeded: outside the budget and not ``force`` (the message carries the
            per-projection sensitivity report).
        BackendUnavailableError: onnxruntime or modelopt missing.
    """
    from nvembed_sdk.exporters.onnx_export import export_onnx
    from nvembed_sdk.exporters.plan import make_plan

    if precision not in QUANT_PRECISIONS:
        raise InputError(fmt("precision", repr(precision), f"one of {QUANT_PRECISIONS}"))
    plan = make_plan("onnx", precision, runtime=runtime, opset=opset)
    if fp8_attention and (precision != "fp8" or plan.runtime != "tensorrt"):
        raise InputError(fmt("--fp8-attention", f"--precision {precision} --runtime {plan.runtime}",
                             "FP8 attention BMMs are for --precision fp8 graphs for TensorRT (--runtime tensorrt)"))
    if fp8_attention:
        head_dim = NVEmbedConfig.from_file(model).text.head_dim
        if not FP8_MHA_HEAD_DIMS[0] < head_dim <= FP8_MHA_HEAD_DIMS[1]:
            raise InputError(fmt("--fp8-attention", f"head dim {head_dim}",
                                 f"TensorRT's FP8 attention fusion needs a head dim in ({FP8_MHA_HEAD_DIMS[0]}, "
                                 f"{FP8_MHA_HEAD_DIMS[1]}]; drop --fp8-attention"))
    attention = fp8_attention if (precision == "fp8" and plan.runtime == "tensorrt") else False
    require("onnxruntime")
    if plan.runtime == "onnxruntime":
        require("modelopt")
    opset = plan.opset
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    size = int(calibration_size or DEFAULT_CALIBRATION_SIZE)
    passages, queries, source = load_calibration_texts(calibration, size)
    # One set of calibration batches, at the length the manifest will record, for the smoothing
    # statistics and the simulation (torch, before tracing) and ModelOpt's calibration (ORT).
    pipe = TextPipeline(model)
    text_length = max_length or NVEmbedConfig.from_file(model).max_length
    batches = calibration_batches(pipe, passages, queries, max_length=min(CALIBRATION_MAX_LENGTH, text_length))
    budget = tolerance_for(precision).min_cosine
    state: dict[str, Any] = {}

    # Short texts (titles, one-word queries) pool over a handful of tokens, so nothing averages
    # their quantisation error out: the simulation also probes 1-4 word prefixes of the texts.
    shorts = [" ".join(t.split()[: 1 + i % 4]) for i, t in enumerate(passages[:64])]
    batches += calibration_batches(pipe, shorts[:32], max_length=16)  # calibrated on, like the rest
    short_batches = calibration_batches(pipe, shorts[32:], max_length=16)  # held out: probed only

    def prepare(torch_model: Any) -> None:  # on the loaded fp32 model, before tracing
        state.update(_prepare(torch_model, batches, precision, budget + SIMULATED_MARGIN, fallback, short_batches,
                              attention))

    phases = Phases(f"export {precision}", total=4 if validate else 3)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        with phases.phase(f"calibrate on {len(batches)} batches, smooth, simulate, trace the {plan.base_dtype} graph"):
            base = export_onnx(model, Path(tmp) / "base", precision=plan.base_dtype, opset=opset, validate=False,
                               max_length=max_length, warn_unvalidated=False,  # validated after quantisation
                               transform=prepare)
        manifest = read_manifest(base)
        manifest.pop("format_version", None)
        manifest.pop("validation", None)
        # Missed only by the simulation's margin (the all-quantised simulation clears the budget
        # itself): the fully quantised graph is tried first and the held-out validation decides;
        # the fallback is built only if that graph really misses. A fallback costs MACs on a guess.
        fb = state.get("fallback")
        trial = bool(validate and fb and fb["simulated_min_cosine_all_quantized"] >= budget)
        tried = None  # the all-quantised graph's held-out report, once measured
        attention0 = copy.deepcopy(state.get("attention"))  # each graph measures its FP8 attention candidate anew
        for keep in ([], list(state["keep"])) if trial else (list(state["keep"]),):
            state["attention"] = copy.deepcopy(attention0)
            report = _write_graph(tmp, out, base, dict(manifest), keep, state, precision, budget, plan, opset, batches,
                                  calibration_method, source, len(passages), len(queries), pipe, model, phases,
                                  validate, texts)
            if not trial:
                break
            if keep:  # the all-quantised graph missed: this is the fallback graph
                _record_trial(out, fb, tried, "fallback")
                break
            tried = report
            if report:
                _record_trial(out, fb, tried, "all quantised")
                break
            log.warning("all-quantised graph outside the budget on held-out text (%s); building the fallback "
                        "(%d kept)", report, len(state["keep"]))
            phases.total += 3  # quantise, audit and validate once more
    if validate and not report:
        ranking = state.get("ranking") or []
        lines = [f"  {r['projection']}: min cosine {r['min_cosine_if_kept']:.4f} if kept high precision "
                 f"(+{r['gain']:.4f})" for r in ranking[:8]]
        detail = ("sensitivity (costliest projections first, simulated on calibration text):\n"
                  + "\n".join(lines)) if lines else "the calibration-text simulation was within budget"
        if not force:
            from nvembed_sdk.errors import ToleranceExceeded

            raise ToleranceExceeded(f"{report}\n{detail}\nNote: --calibration with texts like yours, "
                                    "--precision fp8 on compute capability >= 8.9, or --force to keep it", report)
        log.warning("%s is OUTSIDE the %s budget (kept because of --force):\n%s\n%s", final_path(out), precision, report,
                    detail)
    return out


def _write_graph(tmp: str, out: Path, base: Path, manifest: dict[str, Any], keep: list[str], state: dict[str, Any],
                 precision: str, budget: float, plan: Any, opset: int, batches: list[Batch], calibration_method: str,
                 source: str, n_passages: int, n_queries: int, pipe: TextPipeline, model: str | Path, phases: Phases,
                 validate: bool, texts: list[str] | None) -> Any:
    """Quantise the traced ``base`` graph keeping ``keep`` in high precision, write the bundle's
    files and manifest into ``out``, audit it, and with ``validate`` validate it on ``texts``
    (None: the shipped validation split): the report, or None."""
    from nvembed_sdk.exporters.validate import validate_export

    q_path = Path(tmp) / "model.onnx"
    with phases.phase("ModelOpt PTQ (Q/DQ)" if plan.runtime == "onnxruntime" else "insert Q/DQ"):
        if plan.runtime == "onnxruntime":
            onnx = require("onnx")
            from nvembed_sdk.exporters.qdq import weight_matmuls

            graph = onnx.load(str(base / "model.onnx"), load_external_data=False).graph
            exclude = [f"^{n.name}$" for n, name in zip(weight_matmuls(graph), state["names"], strict=True)
                       if name in keep]
            summary = quantize_onnx(base / "model.onnx", q_path, precision, batches, calibration_method,
                                    exclude=exclude)
            tool = _tool_versions()
        else:
            summary = _qdq_graph(base, q_path, state, precision, budget, set(keep))
            tool = {"tool": "nvembed-sdk (exporters/qdq.py on the fp16 trace)", "method": "max"}
    _move_model(Path(tmp), out)
    pipe.save(out)
    write_st_files(out, source=model)  # sentence-transformers files + embedding_output.json
    files = {"model": "model.onnx", **({"data": "model.onnx.data"} if (out / "model.onnx.data").exists() else {})}
    fb = state.get("fallback")
    quant: dict[str, Any] = {
        **tool, "mode": precision,
        "calibration": {"source": source, "passages": n_passages, "queries": n_queries,
                        "batches": len(batches), "max_length": max(int(b.input_ids.shape[1]) for b in batches)},
        "weights": "per-channel (per output channel)",
        "activations": "per-tensor static",
        "simulated_min_cosine": state["simulated"] if keep or not fb else fb["simulated_min_cosine_all_quantized"],
        **({"smoothing": state["smoothing"]} if state.get("smoothing") else {}),
        **({"o_proj_range": state["o_proj_range"]} if state.get("o_proj_range") else {}),
        **({"attention": state["attention"]} if plan.runtime == "tensorrt" else {}),
        **({"fallback": {**fb, "kept_high_precision": keep}} if fb else {}),
        **summary,
    }
    quant.setdefault("method", calibration_method)
    manifest.update(precision=precision, opset=opset, files=files, plan=plan.to_dict(), quantization=quant)
    manifest.setdefault("build", {})["target_hint"] = _target_hint(precision, plan.runtime)
    write_manifest(out, manifest)
    with phases.phase("graph audit (dtype shares)"):
        _record_graph(out, plan)
    if not validate:
        return None
    with phases.phase("validate against fp32 PyTorch"):
        return validate_export(model, out, texts=texts, raise_on_failure=False)


def _record_trial(out: Path, fallback: dict[str, Any], tried: Any, decided: str) -> None:
    """Record in the manifest that the all-quantised graph was validated first (``tried``: its
    parity report), and which graph the bundle holds."""
    manifest = read_manifest(out)
    manifest.pop("format_version", None)
    manifest["quantization"]["fallback"]["all_quantized_first"] = {
        "why": "the all-quantised simulation cleared the budget but not its margin; the held-out validation decided",
        "validation_min_cosine": round(float(tried.min_cosine), 5),
        "validation_topk_agreement": round(float(tried.topk_agreement), 5), "bundle_holds": decided}
    write_manifest(out, manifest)


def _prepare(torch_model: Any, batches: list[Batch], precision: str, target: float, fallback: bool,
             extra_probe: Sequence[Batch] = (), attention: bool | None = False) -> dict[str, Any]:
    """Smoothing (INT8 and FP8), activation ranges, simulation, (when needed) sensitivity + fallback, FP8 attention.

    ``attention``: FP8 Q/DQ on the attention BMMs. None: on when the simulation with them stays
    at ``target``; True: on, and :class:`InputError` when it does not; False: off.
    """
    import torch

    from nvembed_sdk.exporters import smooth as sm

    # Every 4th batch (short to long) is held out of the statistics: the simulated accuracy then
    # includes the clipping unseen text meets, as the held-out validation does.
    probe = (batches[2::4] if len(batches) >= 4 else batches) + list(extra_probe)
    fit = [b for i, b in enumerate(batches) if i % 4 != 2] if len(batches) >= 4 else batches
    reference = sm._forward(torch_model, probe)
    stats = sm.collect_stats(torch_model, fit)
    # FP8 is smoothed too: E4M3 has 3 mantissa bits, and one per-tensor scale set by a 26x-outlier
    # channel of a down_proj input pushes the other channels towards its subnormals; unsmoothed, that
    # cost the shipped model one fp16 fallback (93 % FP8 MACs); smoothed, all 28 projections stay FP8.
    smoothing = sm.smooth_decoder(torch_model, stats, precision)  # precision: one of QUANT_PRECISIONS
    amax = sm.activation_amax(torch_model, stats)
    names = [n for n, _ in sm.projections(torch_model)]
    quantised = sm.simulate(torch_model, probe, amax, precision)
    simulated = sm.min_cosine(quantised, reference)
    out: dict[str, Any] = {"names": names, "amax": amax, "keep": [], "simulated": round(simulated, 5),
                           "smoothing": {"method": "SmoothQuant on every decoder projection input, folded exactly "
                                         "(q/k/v: attention RMSNorm weight; gate/up: MLP RMSNorm weight; o: v_proj "
                                         "rows, one scale per K/V head and dim; down: up_proj rows)",
                                         "alpha_grid": list(sm.ALPHAS), "per_layer": smoothing} if smoothing else {}}
    if simulated < target:
        # Unseen text can push the attention output past its calibrated range (clipped), never
        # past the V range: widen the o_proj ranges towards that bound as far as held-out text gains.
        bounds = sm.o_input_bounds(torch_model, stats)
        tried = {r: sm.min_cosine(sm.simulate(torch_model, probe, sm.widen_o_ranges(amax, bounds, r), precision),
                                  reference) for r in sm.O_HEADROOM}
        best = max(tried, key=lambda r: tried[r])
        chosen = best if tried[best] > simulated else None
        if chosen is not None:
            log.info("o_proj ranges widened (headroom %.2f towards the V bound): simulated min cosine %.4f -> %.4f",
                     chosen, simulated, tried[chosen])
            amax, simulated = sm.widen_o_ranges(amax, bounds, chosen), tried[chosen]
            out.update(amax=amax, simulated=round(simulated, 5))
            quantised = sm.simulate(torch_model, probe, amax, precision)
        out["o_proj_range"] = {"rule": "calibrated absmax * (V-range bound / calibrated absmax) ** headroom, the "
                               "headroom chosen by the held-out simulated min cosine", "headroom": chosen,
                               "tried": {str(r): round(c, 5) for r, c in tried.items()},
                               "bound": {k: round(v, 5) for k, v in bounds.items()}}
    if simulated < target:
        # Rank on the batches holding the worst rows: the min cosine is decided there (and it is cheap).
        cos = torch.nn.functional.cosine_similarity(quantised.double(), reference.double(), dim=-1)
        starts = np.cumsum([0] + [b.input_ids.shape[0] for b in probe])
        worst = sorted(range(len(probe)), key=lambda i: float(cos[starts[i]:starts[i + 1]].min()))[:3]
        hard = [probe[i] for i in sorted(worst)]
        hard_ref = torch.cat([reference[starts[i]:starts[i + 1]] for i in sorted(worst)])
        _, ranking = sm.sensitivity(torch_model, hard, hard_ref, amax, precision)
        out["ranking"] = ranking
        log.warning("simulated %s min cosine %.4f < %.4f; costliest projections: %s", precision, simulated, target,
                    ", ".join(f"{r['projection']} (+{r['gain']:.4f})" for r in ranking[:5]))
        if fallback:
            # Ranked on the hard batches (n simulations, cheap), chosen on the whole probe (a prefix
            # that meets the target there, by bisection): the kept set holds on all the held-out text.
            keep, cos = sm.choose_fallback(torch_model, probe, reference, amax, precision, ranking, target)
            share = 1 - len(keep) / len(names)
            log.warning("fallback: keeping %d of %d projections in high precision (simulated min cosine %.4f): %s",
                        len(keep), len(names), cos, ", ".join(keep))
            if share < 0.75:
                log.warning("fallback: only %d of %d projections stay %s: this model's error is spread over most of "
                            "them (see the sensitivity ranking); fp16 may serve it better", len(names) - len(keep),
                            len(names), precision)
            out.update(keep=keep, simulated=round(cos, 5))
            out["fallback"] = {"kept_high_precision": keep, "dtype": "high precision (fp16 / fp32 base)",
                               "simulated_min_cosine_all_quantized": round(simulated, 5),
                               "simulated_min_cosine": round(cos, 5), "target": round(target, 5),
                               "sensitivity": ranking}  # every projection, costliest first
    out["attention"] = _fp8_attention(torch_model, fit, out, attention)
    out["attention_wanted"], out["probe"], out["reference"] = attention, probe, reference.numpy()
    out["weights"] = [lin.weight.detach().clone() for _, lin in sm.projections(torch_model)]
    return out


def _fp8_attention(torch_model: Any, fit: Sequence[Batch], state: dict[str, Any],
                   wanted: bool | None) -> dict[str, Any]:
    """FP8 attention BMM ranges (a candidate, measured on the real graph in :func:`_qdq_graph`), or why not."""
    from nvembed_sdk.exporters import smooth as sm

    if wanted is False:
        return {"bmm_dtype": "fp16", "reason": "off (--no-fp8-attention, or not an fp8 graph for TensorRT)"}
    head_dim = torch_model.decoder.layers[0].attn.head_dim
    if not FP8_MHA_HEAD_DIMS[0] < head_dim <= FP8_MHA_HEAD_DIMS[1]:
        return {"bmm_dtype": "fp16", "reason": f"head dim {head_dim} outside TensorRT's FP8 fMHA range"}
    ranges = sm.attention_amax(torch_model, fit)
    for i, r in enumerate(ranges):
        o_name = f"layers.{i}.attn.o_proj"
        if o_name not in state["keep"]:
            # BMM2's output is o_proj's input (after Reshape/Transpose, which commute with a
            # per-tensor Q/DQ): the same scale makes the two quantisations one (idempotent).
            r["out"] = state["amax"][o_name]
    return {"bmm_dtype": "candidate", "ranges": ranges}


def _min_cosine_ort(path: Path, batches: Sequence[Batch], reference: np.ndarray) -> float:
    """Min per-row cosine of the ONNX graph (ONNX Runtime CPU, FP8 emulated) against fp32 PyTorch."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # FP8 before ORT 1.32
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    got = np.concatenate([sess.run(None, {k: v for k, v in b.as_dict().items() if k in names})[0] for b in batches])
    got, ref = got.astype(np.float64), reference.astype(np.float64)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1)).clip(1e-12)
    return float(cos.min())


def _qdq_graph(base: Path, q_path: Path, state: dict[str, Any], precision: str, budget: float,
               keep: set[str]) -> dict[str, Any]:
    onnx = require("onnx")
    from nvembed_sdk.exporters.onnx_export import save_onnx
    from nvembed_sdk.exporters.qdq import insert_qdq

    proto = onnx.load(str(base / "model.onnx"))
    summary = insert_qdq(proto, state["names"], state["weights"], state["amax"], precision, keep)
    if proto.ByteSize() < 1_800_000_000:
        onnx.checker.check_model(proto)
    attention = state.get("attention") or {}
    if attention.get("bmm_dtype") == "candidate":
        from nvembed_sdk.exporters.qdq import insert_attention_qdq

        with_attn = copy.deepcopy(proto)
        added = insert_attention_qdq(with_attn, attention["ranges"])
        save_onnx(with_attn, q_path)
        # Measured, not simulated: the graph itself on the held-out calibration text vs fp32.
        cos = _min_cosine_ort(q_path, state["probe"], state["reference"])
        target = budget + FP8_ATTENTION_MARGIN
        forced = bool(state.get("attention_wanted"))
        attention.update(measured_min_cosine=round(cos, 5), target=round(target, 5))
        if cos >= target:
            attention.update(bmm_dtype="fp8", reason="forced (--fp8-attention)" if forced else "within budget (default)",
                             layout="Q/DQ on Q and K (BMM1), on the softmax output and V (BMM2) and on BMM2's output; "
                                    "per-tensor fp16 scales, E4M3; scores and softmax fp32 (TensorRT's FP8 fMHA "
                                    "pattern)")
            attention["ranges"] = [{k: round(v, 6) for k, v in r.items()} for r in attention["ranges"]]
            summary["qdq_pairs"] += added["qdq_pairs"]
            summary["kept_high_precision"] = [k for k in summary["kept_high_precision"]
                                              if not k.startswith("attention QK")]
            summary["kept_high_precision"].append("attention scores and Softmax fp32 (BMMs FP8)")
            proto = None
        elif forced:
            raise InputError(f"--fp8-attention: min cosine with FP8 attention BMMs {cos:.5f} (ONNX Runtime, held-out "
                             f"calibration text, vs fp32) is below {target:.5f}; drop --fp8-attention (the default "
                             "turns it on only within budget)")
        else:
            log.warning("FP8 attention BMMs off: min cosine %.4f < %.4f on held-out calibration text", cos, target)
            attention.update(bmm_dtype="fp16", reason="over budget on held-out calibration text")
            attention.pop("ranges")
    if proto is not None:
        save_onnx(proto, q_path)
    if state.get("fallback"):
        state["fallback"]["dtype"] = "fp16"
    return summary


def _move_model(tmp: Path, out: Path) -> None:
    for stale in ("model.onnx", "model.onnx.data"):
        (out / stale).unlink(missing_ok=True)
    for f in tmp.iterdir():
        if f.is_file() and f.name.startswith("model.onnx"):
            shutil.move(str(f), out / f.name)


def _tool_versions() -> dict[str, Any]:
    import modelopt
    import onnxruntime

    return {"tool": f"nvidia-modelopt {modelopt.__version__} (modelopt.onnx.quantization)",
            "onnxruntime": onnxruntime.__version__}


def _target_hint(precision: str, runtime: str) -> str:
    if runtime == "onnxruntime":
        return "ONNX Runtime CPU/CUDA (fp32 base); for TensorRT export with --runtime tensorrt"
    if precision == "int8":
        return "TensorRT on any GPU (strongly typed, fp16 base); ONNX Runtime CPU runs it for validation"
    return "TensorRT on compute capability >= 8.9 (strongly typed, fp16 base); ONNX Runtime CPU emulation for validation"


def _record_graph(out: Path, plan: Any) -> None:
    """Which graph the bundle holds and its dtype shares (``nvembed info`` prints them)."""
    from nvembed_sdk.exporters.audit import audit_graph

    manifest = read_manifest(out)
    manifest.pop("format_version", None)
    audit = audit_graph(out)
    manifest["graph"] = {"runtime": plan.runtime, "base_dtype": plan.base_dtype,
                         "fp32_islands": list(plan.fp32_islands), **audit}
    write_manifest(out, manifest)
