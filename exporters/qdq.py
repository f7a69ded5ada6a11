"""The TensorRT-bound Q/DQ graph: the fp16 trace with INT8/FP8 Q/DQ on the decoder projections.

A strongly typed TensorRT build takes every tensor's type from the graph, so the graph is the
fp16 export (``onnx_export.build_graph(..., "fp16")``: RMSNorm statistics, softmax, the RoPE
tables and the head's LayerNorms / pooling / L2 already fp32) and each decoder projection
``MatMul(x (B, T, K) fp16, W (K, N) fp16)`` becomes::

    x -> QuantizeLinear(s_x fp16, zp) -> DequantizeLinear -> MatMul <- DequantizeLinear(W_q (K, N), s_w (N,) fp16, axis 1)

with per-tensor static activation scales and per-output-channel weight scales (the weights are
stored quantised: INT8, or FLOAT8E4M3FN). Inputs read by several projections (q/k/v,
gate/up) share one Q/DQ pair, so TensorRT quantises the tensor once. ModelOpt's own fp16 step
(AutoCast) needs TensorRT to classify the custom head (reference/tensorrt-modelopt.md §1.2),
which CPU hosts lack; the scales here follow the same recipe (max calibration, symmetric).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from nvembed_sdk.errors import ArtifactError, fmt
from nvembed_sdk.exporters.smooth import QMAX

ZP_TYPES = {"int8": "INT8", "fp8": "FLOAT8E4M3FN"}


def weight_matmuls(graph: Any) -> list[Any]:
    """MatMul nodes whose second input is a 2-D initializer, in graph order (the decoder projections)."""
    inits = {t.name: t for t in graph.initializer}
    return [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def _tensor(name: str, arr: np.ndarray | torch.Tensor, precision: str | None = None) -> Any:
    from onnx import TensorProto, numpy_helper

    if precision == "fp8":  # numpy has no float8: raw E4M3 bytes from torch
        t = torch.as_tensor(arr).to(torch.float8_e4m3fn)
        proto = TensorProto()
        proto.name, proto.data_type = name, TensorProto.FLOAT8E4M3FN
        proto.dims.extend(t.shape)
        proto.raw_data = t.view(torch.uint8).numpy().tobytes()
        return proto
    return numpy_helper.from_array(np.asarray(arr), name)


def insert_qdq(proto: Any, names: Sequence[str], weights: Sequence[torch.Tensor], amax: dict[str, float],
               precision: str, keep: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Put Q/DQ on the decoder projection MatMuls of an fp16 graph, in place.

    Args:
        proto: the fp16 ``onnx.ModelProto`` (its MatMuls in :func:`weight_matmuls` order match ``names``).
        names: projection names in graph order (``smooth.projections``).
        weights: the fp32 ``nn.Linear`` weights (out, in) of those projections (smoothed).
        amax: per projection, the absmax of its input.
        precision: ``int8`` or ``fp8``.
        keep: projections left in fp16.

    Returns:
        A summary for the manifest (``quantized_matmuls``, ``kept_high_precision``, ...).
    """
    from onnx import TensorProto, helper

    graph = proto.graph
    mms = weight_matmuls(graph)
    if len(mms) != len(names):
        raise ArtifactError(fmt("fp16 graph", f"{len(mms)} weight MatMuls", f"{len(names)} decoder projections"))
    inits = {t.name: t for t in graph.initializer}
    zp_type = TensorProto.INT8 if precision == "int8" else TensorProto.FLOAT8E4M3FN
    qmax = QMAX[precision]
    shared: dict[tuple[str, float], str] = {}  # (input tensor, scale) -> dequantised name
    new_nodes: dict[str, list[Any]] = {}  # MatMul name -> nodes to put before it
    quantized, kept = [], []
    for k, (node, name, w) in enumerate(zip(mms, names, weights, strict=True)):
        w_init = inits[node.input[1]]
        if tuple(w_init.dims) != (w.shape[1], w.shape[0]):
            raise ArtifactError(fmt(f"MatMul {node.name}", f"weight {list(w_init.dims)}",
                                    f"{name} (in, out) = {[w.shape[1], w.shape[0]]}"))
        if name in keep:
            kept.append(f"{node.name} ({name}, fp16)")
            continue
        before = new_nodes.setdefault(node.name, [])
        s_x = np.float16(max(amax[name], 1e-8) / qmax)
        key = (node.input[0], float(s_x))
        if key not in shared:
            tag = f"qdq{k}"
            graph.initializer.extend([_tensor(f"{tag}.x_scale", np.array(s_x, dtype=np.float16)),
                                      helper.make_tensor(f"{tag}.x_zp", zp_type, [], [0])])
            q_out, dq_out = f"{node.input[0]}_{tag}_q", f"{node.input[0]}_{tag}_dq"
            before += [
                helper.make_node("QuantizeLinear", [node.input[0], f"{tag}.x_scale", f"{tag}.x_zp"], [q_out],
                                 name=f"{node.name}_input_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [q_out, f"{tag}.x_scale", f"{tag}.x_zp"], [dq_out],
                                 name=f"{node.name}_input_DequantizeLinear"),
            ]
            shared[key] = dq_out
        wt = w.detach().float().T.contiguous()  # (K, N): MatMul layout, no Transpose in front of the DQ
        s_w = (wt.abs().amax(0) / qmax).clamp(min=1e-8).half().float()  # (N,), rounded as stored
        wq = wt / s_w
        wq = torch.clamp(torch.round(wq), -128, 127).to(torch.int8).numpy() if precision == "int8" else wq
        base = f"{name}.weight"
        graph.initializer.extend([_tensor(f"{base}_quantized", wq, precision),
                                  _tensor(f"{base}_scale", s_w.half().numpy()),
                                  _tensor(f"{base}_zp", np.zeros(wt.shape[1], dtype=np.int8)) if precision == "int8"
                                  else _tensor(f"{base}_zp", torch.zeros(wt.shape[1]), "fp8")])
        before.append(helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zp"],
                                       [f"{base}_dq"], name=f"{node.name}_weight_DequantizeLinear", axis=1))
        old_w = node.input[1]
        node.input[0], node.input[1] = shared[key], f"{base}_dq"
        quantized.append(node.name)
        if not any(old_w in n.input for n in graph.node):
            graph.initializer.remove(inits[old_w])
    ordered = []
    for n in graph.node:
        ordered += new_nodes.get(n.name, [])
        ordered.append(n)
    del graph.node[:]
    graph.node.extend(ordered)
    return {
        "quantized_matmuls": quantized,
        "kept_high_precision": kept + ["nvembed::LatentAttentionPool (whole head: LayerNorms fp32, GEMMs fp16, "
                                       "pooling and L2 fp32)", "RMSNorm (statistics fp32, weight multiply fp16)",
                                       "attention QK^T / PV MatMuls fp16, scores and Softmax fp32",
                                       "residual Add fp16"],
        "qdq_pairs": sum(1 for n in graph.node if n.op_type == "QuantizeLinear"),
        "zero_point_types": [ZP_TYPES[precision]],
    }


_SCORE_CHAIN = ("Add", "Mul", "Div", "Cast")  # between BMM1 and Softmax: scale, mask add, fp32 casts


def attention_bmms(graph: Any) -> list[tuple[Any, Any, Any]]:
    """(BMM1, Softmax, BMM2) of each decoder layer, in graph order.

    The explicit attention path exports as ``MatMul(q, k^T) -> Cast fp32 -> Mul scale -> Add
    mask -> Softmax -> Cast fp16 -> MatMul(p, v)``; BMM1 is found by following input 0 up
    through the score chain, BMM2 as the MatMul reading the (cast) softmax output as input 0.
    """
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = []
    for sm in (n for n in graph.node if n.op_type == "Softmax"):
        node = producer.get(sm.input[0])
        while node is not None and node.op_type in _SCORE_CHAIN:
            node = producer.get(node.input[0])
        bmm1 = node if node is not None and node.op_type == "MatMul" else None
        out, bmm2 = sm.output[0], None
        for _ in range(4):  # through the fp16 Cast (and, once inserted, the softmax output's Q/DQ)
            nxt = consumers.get(out, [])
            if len(nxt) != 1:
                break
            if nxt[0].op_type == "MatMul" and nxt[0].input[0] == out:
                bmm2 = nxt[0]
                break
            if nxt[0].op_type not in ("Cast", "QuantizeLinear", "DequantizeLinear"):
                break
            out = nxt[0].output[0]
        if bmm1 is None or bmm2 is None:
            raise ArtifactError(fmt(f"Softmax {sm.name}", "not between two MatMuls",
                                    "the explicit attention path (MatMul -> Softmax -> MatMul)"))
        found.append((bmm1, sm, bmm2))
    return found


def insert_attention_qdq(proto: Any, amax: Sequence[dict[str, float]]) -> dict[str, Any]:
    """FP8 Q/DQ on the attention BMMs of an fp16 graph, in place, in TensorRT's FP8 MHA layout.

    The fused FP8 attention (fMHA v2) TensorRT and ModelOpt match is
    ``Q -> DQ -> BMM1 -> (Mul) -> (Add) -> Softmax -> (Cast) -> Q -> DQ -> BMM2 -> Q -> DQ``
    with both BMM1 inputs (Q, K^T) and BMM2's V input quantised; all scales per-tensor (fp16
    scalars, FLOAT8E4M3FN zero points). The scores and softmax stay fp32 in between.

    Args:
        proto: the fp16 ``onnx.ModelProto`` (decoder Softmaxes in layer order).
        amax: per layer ``{"q", "k", "v", "p", "out"}`` ranges (``smooth.attention_amax``).

    Returns:
        ``{"layers": n, "qdq_pairs": added}``.
    """
    from onnx import helper

    graph = proto.graph
    trios = attention_bmms(graph)
    if len(trios) != len(amax):
        raise ArtifactError(fmt("fp16 graph", f"{len(trios)} attention Softmaxes", f"{len(amax)} decoder layers"))
    before: dict[str, list[Any]] = {}
    after: dict[str, list[Any]] = {}
    added = 0

    def qdq(layer: int, what: str, src: str, dst: str, node: str) -> list[Any]:
        tag = f"attn{layer}.{what}"
        s = np.float16(max(amax[layer][what], 1e-8) / QMAX["fp8"])
        graph.initializer.extend([_tensor(f"{tag}_scale", np.array(s, dtype=np.float16)),
                                  _tensor(f"{tag}_zp", torch.zeros(()), "fp8")])
        return [helper.make_node("QuantizeLinear", [src, f"{tag}_scale", f"{tag}_zp"], [f"{dst}_q"],
                                 name=f"{node}_{what}_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [f"{dst}_q", f"{tag}_scale", f"{tag}_zp"], [dst],
                                 name=f"{node}_{what}_DequantizeLinear")]

    for layer, (bmm1, _sm, bmm2) in enumerate(trios):
        for bmm, names in ((bmm1, ("q", "k")), (bmm2, ("p", "v"))):  # both inputs of Q.K^T and of P.V
            nodes = []
            for idx, what in enumerate(names):
                src = bmm.input[idx]
                nodes += qdq(layer, what, src, f"{src}_fp8dq", bmm.name)
                bmm.input[idx] = f"{src}_fp8dq"
            before[bmm.name] = nodes
        out = bmm2.output[0]
        bmm2.output[0] = f"{out}_fp8pre"
        after[bmm2.name] = qdq(layer, "out", f"{out}_fp8pre", out, bmm2.name)
        added += 5
    ordered = []
    for n in graph.node:
        ordered += before.get(n.name, [])
        ordered.append(n)
        ordered += after.get(n.name, [])
    del graph.node[:]
    graph.node.extend(ordered)
    return {"layers": len(trios), "qdq_pairs": added}
