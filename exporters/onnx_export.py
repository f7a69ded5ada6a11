"""Checkpoint -> ONNX bundle (``model.onnx`` (+ ``model.onnx.data``), ``nvembed.json``, tokenizer).

Graph contract: inputs ``input_ids``, ``attention_mask``, ``pool_mask`` (int64 [batch, seq], both
dynamic), output ``embeddings`` (float32 [batch, dim], L2-normalised). The decoder is traced
with the dynamo exporter (explicit MatMul -> fp32 Softmax -> MatMul attention); the head is one
``nvembed::LatentAttentionPool`` node carrying its local function (exporters/custom_op.py), with
the latents' K/V folded to constants. The pool mask comes from the host text pipeline.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nvembed_sdk._optional import require
from nvembed_sdk.bundle_files import check_token_range
from nvembed_sdk.checkpoint import load_model
from nvembed_sdk.config import NVEmbedConfig
from nvembed_sdk.errors import ArtifactError, InputError, fmt
from nvembed_sdk.exporters.custom_op import DOMAIN, OP_NAME, OP_VERSION, WEIGHT_INPUTS, head_function
from nvembed_sdk.exporters.staging import final_path, staged
from nvembed_sdk.manifest import INPUT_NAMES, OUTPUT_NAME, POOL_RULE, checkpoint_hash, write_manifest
from nvembed_sdk.model import RMSNorm
from nvembed_sdk.text import TextPipeline

log = logging.getLogger("nvembed_sdk.export")

ONNX_PRECISIONS = ("fp32", "fp16")
DEFAULT_OPSET = 20  # parses on Jetson Orin's TensorRT 10.3; FP8 Q/DQ re-exports at 21
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights; protobuf cannot serialise past 2 GB


class _DecoderGraph(nn.Module):
    """(input_ids, attention_mask) -> last hidden state (B, T, D)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids, attention_mask)


def _trace_decoder(model: nn.Module, opset: int) -> Any:
    for layer in model.decoder.layers:
        layer.attn.explicit_attention = True
    for module in model.decoder.modules():
        if isinstance(module, RMSNorm):
            module.div_form = True
    # Unequal lengths and batch/seq >= 2 so nothing specialises on the example (tensorrt-modelopt.md §5.3).
    ids = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 2, 2, 2, 2], [1, 10, 11, 2, 2, 2]])
    mask = (torch.arange(6)[None] < torch.tensor([[6], [3], [4]])).long()
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=model.cfg.text.max_position_embeddings)
    import warnings

    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notices are noise here
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _DecoderGraph(model), (ids, mask), dynamo=True, opset_version=opset,
            input_names=["input_ids", "attention_mask"], output_names=["hidden"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            verbose=False,
        )
    quiet.setLevel(level)
    return program.model_proto


def _head_initializers(model: nn.Module, np_dtype: Any) -> dict[str, np.ndarray]:
    """The head's weights as node inputs, folded (custom_op docstring; shapes in WEIGHT_INPUTS)."""
    head = model.head
    cfg = head.cfg
    h, r, dh = cfg.num_cross_heads, cfg.num_latents_value, cfg.cross_dim_head
    with torch.no_grad():
        k, v = (t.double() for t in head.compute_kv())  # (h, r, dh) each
        w_q = head.to_q.weight.detach().double().T.reshape(-1, h, dh)  # (D, h, dh)
        w_out = head.to_out.weight.detach().double().T.reshape(h, dh, -1)  # (h, dh, D)
        # Products in float64, rounded once to the export dtype (custom_op module docstring).
        w_qk = torch.einsum("dhe,hre->dhr", w_q, k * dh**-0.5).reshape(w_q.shape[0], h * r)  # (D, h*r)
        w_vo = torch.einsum("hre,hed->hrd", v, w_out).reshape(h * r, -1)  # (h*r, D)

        def mm(w: torch.Tensor) -> np.ndarray:  # nn.Linear (out, in) -> MatMul (in, out)
            return w.detach().float().T.contiguous().numpy().astype(np_dtype)

        def f32(t: torch.Tensor) -> np.ndarray:
            return t.detach().float().contiguous().numpy()

        def vec(t: torch.Tensor) -> np.ndarray:
            return f32(t).astype(np_dtype)

        D = head.ff_out.weight.shape[0]

        weights = {
            "norm_q_weight": f32(head.norm_q.weight), "norm_q_bias": f32(head.norm_q.bias),
            "w_qk": vec(w_qk), "w_vo": vec(w_vo),
            "norm_ff_weight": f32(head.norm_ff.weight), "norm_ff_bias": f32(head.norm_ff.bias),
            # GEGLU: the first half of ff_in's outputs is the value, the second the gate.
            "w_ff_val": mm(head.ff_in.weight[: 4 * D]), "b_ff_val": vec(head.ff_in.bias[: 4 * D]),
            "w_ff_gate": mm(head.ff_in.weight[4 * D :]), "b_ff_gate": vec(head.ff_in.bias[4 * D :]),
            "w_ff_out": mm(head.ff_out.weight), "b_ff_out": vec(head.ff_out.bias),
        }
    assert tuple(weights) == WEIGHT_INPUTS
    return weights


def build_graph(model: nn.Module, precision: str = "fp32", opset: int = DEFAULT_OPSET) -> Any:
    """Trace the decoder and attach the ``nvembed`` head node. Returns an ``onnx.ModelProto``.

    Args:
        model: an :class:`NVEmbedModel` in fp32 (fp16 export casts a copy's weights).
        precision: ``fp32`` or ``fp16``. Defaults to fp32.
        opset: default-domain opset. Defaults to 20.
    """
    onnx = require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    if precision not in ONNX_PRECISIONS:
        raise InputError(fmt("precision", repr(precision), f"one of {ONNX_PRECISIONS} for plain ONNX export"))
    compute = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
    np_dtype = np.float16 if precision == "fp16" else np.float32
    head_weights = _head_initializers(model, np_dtype)
    traced = model if precision == "fp32" else _half_copy(model)
    proto = _trace_decoder(traced, opset)
    graph = proto.graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    if dims != ["batch", "seq"]:
        raise ArtifactError(fmt("traced input_ids", f"dims {dims}", "dynamic ['batch', 'seq']"))
    graph.input.append(helper.make_tensor_value_info("pool_mask", TensorProto.INT64, ["batch", "seq"]))
    prefix = "nvembed_head."
    for name, arr in head_weights.items():
        graph.initializer.append(numpy_helper.from_array(arr, prefix + name))
    hidden = graph.output[0].name
    graph.node.append(helper.make_node(
        OP_NAME, [hidden, "pool_mask", *(prefix + n for n in WEIGHT_INPUTS)], [OUTPUT_NAME],
        name="nvembed_head", domain=DOMAIN,
    ))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", model.cfg.dim]))
    proto.functions.append(head_function(model.cfg.latent.num_cross_heads, model.cfg.latent.num_latents_value,
                                         compute, opset))
    proto.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    proto.producer_name = "nvembed-sdk"
    if _weight_bytes(proto) < EXTERNAL_DATA_THRESHOLD:  # protobuf cannot serialise > 2 GB in memory
        onnx.checker.check_model(proto)
    return proto


def _weight_bytes(proto: Any) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def _half_copy(model: nn.Module) -> nn.Module:
    import copy

    half = copy.deepcopy(model).half()
    # RMSNorm weights stay fp16 (the release multiplies in the activation dtype); statistics are
    # computed in fp32 inside RMSNorm.forward and attention softmax in fp32 (explicit_attention).
    return half


def save_onnx(proto: Any, path: Path) -> list[str]:
    """Save, with external data when the weights pass ~1.8 GB. Returns the files written."""
    onnx = require("onnx")
    if _weight_bytes(proto) >= EXTERNAL_DATA_THRESHOLD:
        data = path.name + ".data"
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        onnx.checker.check_model(str(path))  # by path: resolves the external data
        return [path.name, data]
    onnx.save_model(proto, str(path))
    return [path.name]


@staged("output")  # written beside `output`, moved into place when complete and validated
def export_onnx(
    model: str | Path,
    output: str | Path,
    precision: str = "fp32",
    opset: int | None = None,
    validate: bool = True,
    max_length: int | None = None,
    texts: list[str] | None = None,
    warn_unvalidated: bool = True,
    transform: Callable[[Any], Any] | None = None,
) -> Path:
    """Export a checkpoint to an ONNX bundle and validate it against PyTorch fp32.

    Args:
        model: checkpoint directory (released layout, with tokenizer.json).
        output: bundle directory, written through a staging directory beside it
            (exporters/staging.py). Must be new, empty, or a bundle with ``overwrite``.
        overwrite: replace an existing bundle at ``output`` whole. Defaults to False.
        precision: ``fp32`` or ``fp16``. Defaults to fp32.
        opset: ONNX opset. Defaults to 20 (≤ 20 builds on Jetson Orin's TensorRT 10.3).
        validate: compare with PyTorch fp32 on real text at untraced shapes and fail outside the
            README budget. Defaults to True.
        max_length: text max length recorded in the manifest. Defaults to the checkpoint's.
        texts: validation texts. Defaults to the SDK's held-out real text.
        warn_unvalidated: log a warning when ``validate`` is False. Defaults to True (False
            for intermediate graphs that are validated after a later step, e.g. quantisation).
        transform: called on the loaded fp32 ``NVEmbedModel`` before tracing, for exact
            re-parametrisations such as the INT8 export's smoothing. Defaults to None.

    Returns:
        The bundle directory.

    Raises:
        ToleranceExceeded: validation outside the budget (nothing is written at ``output``).
        ArtifactError: ``output`` holds other files, or another export is writing it.
    """
    src = Path(model)
    cfg = NVEmbedConfig.from_file(src)
    pipe = TextPipeline(src)  # fails early on a missing tokenizer
    check_token_range(src, cfg.text.vocab_size)  # and on one with more ids than the embedding
    opset = int(opset or DEFAULT_OPSET)
    if opset < 18:
        raise InputError(fmt("opset", opset, ">= 18 (LayerNormalization, Split num_outputs)"))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch_model = load_model(src, dtype="float32")
    if transform is not None:
        transform(torch_model)
    proto = build_graph(torch_model, precision, opset)
    del torch_model
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        files = save_onnx(proto, Path(tmp) / "model.onnx")
        del proto
        for stale in ("model.onnx", "model.onnx.data"):
            (out / stale).unlink(missing_ok=True)
        for f in files:
            shutil.move(str(Path(tmp) / f), out / f)
    pipe.save(out)
    _write_integration_files(out, src)
    manifest = {
        "kind": "onnx",
        "precision": precision,
        "opset": opset,
        "files": {"model": "model.onnx", **({"data": "model.onnx.data"} if len(files) > 1 else {})},
        "io": {"inputs": list(INPUT_NAMES), "outputs": [OUTPUT_NAME], "dynamic_axes": ["batch", "seq"]},
        "custom_ops": [{"domain": DOMAIN, "name": OP_NAME, "version": OP_VERSION, "local_function": True}],
        "model": _model_facts(cfg),
        "text": _text_facts(pipe, max_length or cfg.max_length, cfg),
        "source": {"checkpoint": str(src.resolve()), "sha256": checkpoint_hash(src)},
        "build": {"tool": "nvembed-sdk", "torch": torch.__version__, "onnx": require("onnx").__version__,
                  "seconds": round(time.perf_counter() - t0, 1)},
    }
    write_manifest(out, manifest)
    if validate:
        from nvembed_sdk.exporters.validate import validate_export

        validate_export(src, out, texts=texts)  # records the report in nvembed.json, raises outside budget
    else:
        if warn_unvalidated:
            log.warning("export validation SKIPPED (--no-validate): %s is not checked against PyTorch", final_path(out))
        manifest["validation"] = {"skipped": True}
        write_manifest(out, manifest)
    return out


def _write_integration_files(out: Path, src: Path) -> None:
    from nvembed_sdk.integrations.st_files import write_st_files

    write_st_files(out, source=src)  # sentence-transformers files + the model's embedding_output.json


def _model_facts(cfg: NVEmbedConfig) -> dict[str, Any]:
    t, la = cfg.text, cfg.latent
    return {"architecture": "NVEmbedModel", "dim": cfg.dim, "num_parameters": cfg.num_parameters,
            "num_hidden_layers": t.num_hidden_layers, "hidden_size": t.hidden_size, "vocab_size": t.vocab_size,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "num_latents": la.num_latents_value, "num_cross_heads": la.num_cross_heads,
            "cross_dim_head": la.cross_dim_head, "max_position_embeddings": t.max_position_embeddings}


def _text_facts(pipe: TextPipeline, max_length: int, cfg: NVEmbedConfig) -> dict[str, Any]:
    return {"max_length": int(max_length), "eos_token": pipe.eos_token, "pad_id": pipe.pad_id,
            "padding_side": "right", "pool_rule": POOL_RULE, "mask_instruction": cfg.is_mask_instruction}
