"""Graph audit: which dtype each tensor and each GEMM of an ONNX bundle runs in.

:func:`audit_graph` runs the graph once in ONNX Runtime (CPU) at batch 1 x ``seq`` tokens with
every intermediate tensor as an output, so shapes and dtypes are the real ones, then reports:

* ``macs``: share of multiply-accumulates per compute dtype. A MatMul fed by two
  DequantizeLinear nodes computes in the quantised type (int8 / fp8, what TensorRT fuses it
  into), otherwise in its input dtype. The head (``nvembed::LatentAttentionPool``) is counted
  from its weight shapes in the head's GEMM dtype. ``decoder_gemm_macs`` and
  ``attention_bmm_macs`` split the decoder's MatMuls into weight GEMMs and attention BMMs.
* ``activation_bytes``: share of bytes of the float activation tensors per dtype (quantised
  tensors count as int8 / fp8).
* ``fp32_outside_islands``: float32 activations not produced inside an fp32 island (RMSNorm,
  attention scores/softmax, RoPE tables, the head) and not a Q/DQ scale; empty for a
  TensorRT-bound quantised graph.

The node's module scope comes from the exporter's ``pkg.torch.onnx.name_scopes`` metadata.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk._optional import require

_DTYPE = {np.dtype("float32"): "fp32", np.dtype("float16"): "fp16", np.dtype("int8"): "int8",
          np.dtype("uint8"): "int8"}
_ATTN_SCORE_OPS = {"Cast", "Mul", "Add", "Softmax"}


def _scope(node: Any) -> str:
    md = {m.key: m.value for m in node.metadata_props}
    return md.get("pkg.torch.onnx.name_scopes", "")


def score_chain(nodes: Sequence[Any]) -> set[str]:
    """First outputs of the attention nodes between QKᵀ and the softmax (the score cast, scale, mask add, softmax).

    Walks back from each attention Softmax through Cast/Mul/Add producers of the same attention
    scope, stopping at the QKᵀ MatMul: the RoPE Mul/Add upstream of that MatMul are not in the
    chain, so an fp32 RoPE (or any other fp32 op in the attention block) is reported, not excused.
    """
    producer = {o: n for n in nodes for o in n.output}
    chain: set[str] = set()
    stack = [n for n in nodes if n.op_type == "Softmax" and ".attn'" in _scope(n)]
    while stack:
        n = stack.pop()
        if n.output[0] in chain:  # output names are unique in a graph; node names need not be
            continue
        chain.add(n.output[0])
        for i in n.input:
            p = producer.get(i)
            if p is not None and p.op_type in _ATTN_SCORE_OPS and ".attn'" in _scope(p):
                stack.append(p)
    return chain


def _in_island(node: Any, scores: set[str] | frozenset[str] = frozenset()) -> str | None:
    scope = _scope(node)
    if node.domain == "nvembed":
        return "head"
    if "_norm'" in scope or "decoder.norm'" in scope:
        return "RMSNorm statistics"
    if node.output and node.output[0] in scores:
        return "attention scores / softmax"
    if scope.startswith("['', 'decoder', '") and "layers" not in scope:
        return "RoPE tables"
    return None


def audit_graph(path: str | Path, seq: int = 128) -> dict[str, Any]:
    """Dtype shares of MACs and activation bytes, and fp32 tensors outside the islands.

    Args:
        path: a bundle directory or its ``model.onnx``.
        seq: tokens of the probe row. Defaults to 128.

    Returns:
        ``{"probe": "1x128", "macs": {dtype: share}, "activation_bytes": {dtype: share},
        "decoder_gemm_macs": {dtype: share}, "attention_bmm_macs": {dtype: share},
        "fp32_outside_islands": [...]}``.
    """
    onnx = require("onnx")
    ort = require("onnxruntime")
    from onnx import TensorProto, helper, shape_inference

    p = Path(path)
    model_path = p / "model.onnx" if p.is_dir() else p
    proto = onnx.load(str(model_path))
    inferred = shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    inits = {t.name for t in proto.graph.initializer}
    known = {o.name for o in proto.graph.output}
    producer = {o: n for n in proto.graph.node for o in n.output}
    for n in proto.graph.node:
        for o in n.output:
            if o and o not in known and o in types and types[o] != TensorProto.UNDEFINED:
                proto.graph.output.append(helper.make_tensor_value_info(o, types[o], None))
                known.add(o)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    ids = np.full((1, seq), 5, dtype=np.int64)
    ids[0, -1] = 2
    ones = np.ones((1, seq), dtype=np.int64)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, {"input_ids": ids, "attention_mask": ones, "pool_mask": ones}),
                      strict=True))
    shapes = {k: v.shape for k, v in values.items()}
    for t in proto.graph.initializer:
        shapes[t.name] = tuple(t.dims)

    init_type = {t.name: t.data_type for t in proto.graph.initializer}

    def zp_type(node: Any) -> str:  # int8 or fp8, from the Q/DQ zero point (ORT hands fp8 back as bytes)
        t = init_type.get(node.input[2]) if len(node.input) > 2 else None
        return "fp8" if t in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2) else "int8"

    def qtype(name: str) -> str | None:  # the quantised type behind a DequantizeLinear output
        n = producer.get(name)
        return zp_type(n) if n is not None and n.op_type == "DequantizeLinear" else None

    macs: dict[str, float] = defaultdict(float)
    gemm: dict[str, float] = defaultdict(float)
    bmm: dict[str, float] = defaultdict(float)
    for n in proto.graph.node:
        if n.op_type == "MatMul":
            a = shapes.get(n.input[0])
            out = values.get(n.output[0])
            if a is None or out is None:
                continue
            count = float(np.prod(out.shape)) * a[-1]
            qa, qb = qtype(n.input[0]), qtype(n.input[1])
            dtype = qa if (qa and qb) else _DTYPE.get(out.dtype, str(out.dtype))
            macs[dtype] += count
            if n.input[1] in inits or (producer.get(n.input[1]) and producer[n.input[1]].input[0] in inits):
                gemm[dtype] += count
            else:  # activation x activation: the attention BMMs (Q K^T, P V)
                bmm[dtype] += count
        elif n.domain == "nvembed":
            w = {i: shapes[name] for i, name in enumerate(n.input) if name in shapes}
            w_qk = next(t for t in proto.graph.initializer if t.name == n.input[4])
            head_dtype = {TensorProto.FLOAT16: "fp16"}.get(w_qk.data_type, "fp32")
            # per token: (D) @ w_qk (D, h*r), probs @ w_vo (h*r, D), GEGLU FF 2 x (D, 4D) + (4D, D)
            macs[head_dtype] += seq * sum(float(np.prod(w[i])) for i in (4, 5, 8, 10, 12))
    act: dict[str, float] = defaultdict(float)
    outside = []
    scores = score_chain(proto.graph.node)
    for n in proto.graph.node:
        for o in n.output:
            v = values.get(o)
            if v is None or v.dtype.kind not in "fiu" or v.dtype == np.int64 or v.dtype == np.bool_:
                continue
            if v.dtype.kind in "iu" and n.op_type != "QuantizeLinear":
                continue
            dtype = zp_type(n) if n.op_type == "QuantizeLinear" else _DTYPE.get(v.dtype, str(v.dtype))
            act[dtype] += v.size if dtype in ("int8", "fp8") else v.nbytes
            if dtype == "fp32" and n.domain != "nvembed" and _in_island(n, scores) is None:
                outside.append(f"{o} ({n.op_type}, {_scope(n)[-60:]})")

    def share(d: dict[str, float]) -> dict[str, float]:
        total = sum(d.values()) or 1.0
        return {k: round(v / total, 4) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}

    return {"probe": f"1x{seq}", "macs": share(macs), "activation_bytes": share(act),
            "decoder_gemm_macs": share(gemm), "attention_bmm_macs": share(bmm), "fp32_outside_islands": outside}


def format_shares(shares: dict[str, float]) -> str:
    """``{"int8": 0.93, "fp16": 0.07}`` -> ``"int8 93.0%, fp16 7.0%"``."""
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items())
