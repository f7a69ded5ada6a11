"""The ``nvembed`` custom-op domain: the latent-attention head as one ONNX node.

``nvembed::LatentAttentionPool(hidden, pool_mask, <weights>) -> embeddings`` computes the whole
NV-Embed head (reference/NV-Embed-v2.md §3.3): PreNorm cross-attention of the tokens against the
constant latent K/V, GEGLU feed-forward, masked mean over the pool mask and L2 normalisation.

The node carries an ONNX *model-local function* with the same (domain, name), written in
standard ops, so ONNX Runtime and TensorRT's ONNX parser inline it, ModelOpt can calibrate
through it on a CPU, and a runtime with a fused kernel can match the node by name instead.

Weights enter as node inputs (function bodies cannot hold initialisers). The latents' K/V is a
constant of the checkpoint, folded at export: ``k_scaled_t`` = K·(1/√dh) transposed to
(heads, dh, r) and ``v`` (heads, r, dh); ``to_kv`` itself is not in the graph.
"""

from __future__ import annotations

from typing import Any

DOMAIN = "nvembed"
OP_NAME = "LatentAttentionPool"
OP_VERSION = 1

# Node inputs, in order (after hidden and pool_mask). Shapes for width D, heads h, head dim dh,
# latents r: norm_* (D,), w_q (D, h*dh), k_scaled_t (h, dh, r), v (h, r, dh), w_out (h*dh, D),
# w_ff_in (D, 8D), b_ff_in (8D,), w_ff_out (4D, D), b_ff_out (D,).
WEIGHT_INPUTS = (
    "norm_q_weight", "norm_q_bias", "w_q", "k_scaled_t", "v", "w_out",
    "norm_ff_weight", "norm_ff_bias", "w_ff_in", "b_ff_in", "w_ff_out", "b_ff_out",
)


def head_function(num_heads: int, head_dim: int, compute_dtype: int, opset: int) -> Any:
    """Build the FunctionProto of ``nvembed::LatentAttentionPool``.

    Args:
        num_heads: cross-attention heads (h).
        head_dim: per-head width (dh).
        compute_dtype: ``onnx.TensorProto.FLOAT`` or ``FLOAT16``: dtype of the hidden states and
            the matmul weights. LayerNorm statistics, softmax, pooling and normalisation always
            run in fp32 (the LayerNorm weights are fp32 initialisers).
        opset: default-domain opset of the body.

    Returns:
        onnx.FunctionProto.
    """
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    nodes = []

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"{OP_NAME}/{output}", **attrs))
        return output

    def const(name: str, value: Any, dtype: int = TensorProto.INT64) -> str:
        vals = value if isinstance(value, list) else [value]
        dims = [len(vals)] if isinstance(value, list) else []
        return node("Constant", [], name, value=helper.make_tensor(name + "_value", dtype, dims, vals))

    def to_compute(x: str) -> str:
        return x if compute_dtype == f32 else node("Cast", [x], x + "_c", to=compute_dtype)

    inner = num_heads * head_dim
    shape_bthd = const("shape_bthd", [0, 0, num_heads, head_dim])
    shape_btc = const("shape_btc", [0, 0, inner])
    axes_t = const("axes_t", [1])
    axes_last = const("axes_last", [-1])
    # 1. PreNorm cross-attention: tokens are queries, latents keys/values. hidden: (B, T, D)
    h32 = node("Cast", ["hidden"], "hidden_f32", to=f32)
    hn = node("LayerNormalization", [h32, "norm_q_weight", "norm_q_bias"], "hn", axis=-1, epsilon=1e-5)
    q = node("MatMul", [to_compute(hn), "w_q"], "q")  # (B, T, h*dh)
    q = node("Reshape", [q, shape_bthd], "q4")  # (B, T, h, dh)
    q = node("Transpose", [q], "q_bhtd", perm=[0, 2, 1, 3])  # (B, h, T, dh)
    scores = node("MatMul", [q, "k_scaled_t"], "scores")  # (B, h, T, r), scale folded into K
    probs = node("Softmax", [node("Cast", [scores], "scores_f32", to=f32)], "probs", axis=-1)
    o = node("MatMul", [to_compute(probs), "v"], "attn")  # (B, h, T, dh)
    o = node("Transpose", [o], "attn_bthd", perm=[0, 2, 1, 3])
    o = node("Reshape", [o, shape_btc], "attn_btc")  # (B, T, h*dh), head-major as the release
    o = node("MatMul", [o, "w_out"], "attn_out")  # (B, T, D)
    h1 = node("Add", [node("Cast", [o], "attn_out_f32", to=f32), h32], "h1")  # residual, fp32
    # 2. PreNorm GEGLU feed-forward: value half first, exact-erf GELU on the gate half.
    ln = node("LayerNormalization", [h1, "norm_ff_weight", "norm_ff_bias"], "ln_ff", axis=-1, epsilon=1e-5)
    x = node("Add", [node("MatMul", [to_compute(ln), "w_ff_in"], "ff_mm"), "b_ff_in"], "ff_in")  # (B, T, 8D)
    nodes.append(helper.make_node("Split", [x], ["ff_val", "ff_gate"], name=f"{OP_NAME}/split", axis=-1,
                                  num_outputs=2))
    g = "ff_gate"
    half = const("half", 0.5, compute_dtype)
    one = const("one", 1.0, compute_dtype)
    sqrt2 = const("sqrt2", 1.4142135623730951, compute_dtype)
    # Exact erf GELU written as (g * (erf(g / sqrt2) + 1)) * 0.5: the pattern ONNX Runtime
    # and TensorRT fuse into one Gelu kernel, and valid at every opset (Gelu is opset 20).
    erf = node("Erf", [node("Div", [g, sqrt2], "gate_scaled")], "gate_erf")
    gelu = node("Mul", [node("Mul", [g, node("Add", [erf, one], "gate_erf1")], "gate_x_erf1"), half], "gelu")
    ff = node("Add", [node("MatMul", [node("Mul", ["ff_val", gelu], "geglu"), "w_ff_out"], "ff_mm2"), "b_ff_out"],
              "ff_out")  # (B, T, D)
    h2 = node("Add", [node("Cast", [ff], "ff_out_f32", to=f32), h1], "h2")
    # 3. Masked mean over the pool mask (plain division, as the release) and L2 normalisation.
    m = node("Unsqueeze", [node("Cast", ["pool_mask"], "pool_f32", to=f32), axes_last], "pool_b_t_1")  # (B, T, 1)
    s = node("ReduceSum", [node("Mul", [h2, m], "masked"), axes_t], "pool_sum", keepdims=0)  # (B, D)
    d = node("ReduceSum", [m, axes_t], "pool_count", keepdims=0)  # (B, 1)
    e = node("Div", [s, d], "pooled")
    n = node("ReduceL2", [e, axes_last], "norm", keepdims=1)  # (B, 1)
    n = node("Max", [n, const("eps", 1e-12, f32)], "norm_eps")
    node("Div", [e, n], "embeddings")
    return helper.make_function(
        DOMAIN, OP_NAME, ["hidden", "pool_mask", *WEIGHT_INPUTS], ["embeddings"], nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        doc_string="NV-Embed latent-attention head + masked mean + L2 normalise (nvembed-sdk).",
    )
