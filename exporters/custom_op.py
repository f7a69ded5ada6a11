"""The ``nvembed`` custom-op domain: the latent-attention head as one ONNX node.

``nvembed::LatentAttentionPool(hidden, pool_mask, <weights>) -> embeddings`` computes the whole
NV-Embed head (reference/NV-Embed-v2.md §3.3): PreNorm cross-attention of the tokens against the
constant latent K/V, GEGLU feed-forward, masked mean over the pool mask and L2 normalisation.

The node carries an ONNX *model-local function* with the same (domain, name), written in
standard ops, so ONNX Runtime and TensorRT's ONNX parser inline it, ModelOpt can calibrate
through it on a CPU, and a runtime with a fused kernel can match the node by name instead.

Weights enter as node inputs (function bodies cannot hold initialisers). Everything that does
not depend on the text is folded at export, so the body does less work per token than the
PyTorch module while computing the same function (reassociated products, fp32 rounding only):

* the latents' K/V is a constant of the checkpoint (``to_kv`` is not in the graph), and the
  per-head query and key maps are one matrix: ``w_qk[:, h*r:(h+1)*r] = W_q,h · K_h^T / √dh``
  (D, heads·r), so the scores come from one MatMul of the normed tokens, no transposes;
* values and output projection likewise: ``w_vo[h*r:(h+1)*r] = V_h · W_out,h`` (heads·r, D),
  so ``Σ_h softmax_h · V_h · W_out,h`` is one MatMul of the concatenated probabilities;
* the feed-forward's output projection is linear and pooling is a mean, so ``ff_out`` is
  applied once per text to the pooled GEGLU activations instead of once per token.

Per token that is D·h·r + h·r·D + 8D² multiply-adds instead of D·h·dh + 2·h·r·dh + h·dh·D + 12D²
(about 0.65 M instead of 0.95 M on the shipped model; negligible either way on the 7B model).
Version 2 of the op (version 1 took ``w_q``, ``k_scaled_t``, ``v``, ``w_out`` and one ``w_ff_in``).
"""

from __future__ import annotations

from typing import Any

DOMAIN = "nvembed"
OP_NAME = "LatentAttentionPool"
OP_VERSION = 2

# Node inputs, in order (after hidden and pool_mask). Shapes for width D, heads h, latents r:
# norm_* (D,), w_qk (D, h*r), w_vo (h*r, D), w_ff_val and w_ff_gate (D, 4D) (the two halves of
# ff_in), b_ff_val and b_ff_gate (4D,), w_ff_out (4D, D), b_ff_out (D,).
WEIGHT_INPUTS = (
    "norm_q_weight", "norm_q_bias", "w_qk", "w_vo", "norm_ff_weight", "norm_ff_bias",
    "w_ff_val", "b_ff_val", "w_ff_gate", "b_ff_gate", "w_ff_out", "b_ff_out",
)


def head_function(num_heads: int, num_latents: int, compute_dtype: int, opset: int) -> Any:
    """Build the FunctionProto of ``nvembed::LatentAttentionPool``.

    Args:
        num_heads: cross-attention heads (h).
        num_latents: latents (r).
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

    def to_f32(x: str) -> str:
        return x if compute_dtype == f32 else node("Cast", [x], x + "_f32", to=f32)

    shape_bthr = const("shape_bthr", [0, 0, num_heads, num_latents])
    shape_btc = const("shape_btc", [0, 0, num_heads * num_latents])
    axes_t = const("axes_t", [1])
    axes_last = const("axes_last", [-1])
    # 1. PreNorm cross-attention: tokens are queries, latents keys/values. hidden: (B, T, D)
    h32 = node("Cast", ["hidden"], "hidden_f32", to=f32)
    hn = node("LayerNormalization", [h32, "norm_q_weight", "norm_q_bias"], "hn", axis=-1, epsilon=1e-5)
    scores = to_f32(node("MatMul", [to_compute(hn), "w_qk"], "scores"))  # (B, T, h*r), scale folded
    scores = node("Reshape", [scores, shape_bthr], "scores4")  # (B, T, h, r)
    probs = node("Softmax", [scores], "probs4", axis=-1)  # per head over the latents, fp32
    probs = node("Reshape", [probs, shape_btc], "probs")  # (B, T, h*r), head-major as w_vo
    o = node("MatMul", [to_compute(probs), "w_vo"], "attn_out")  # (B, T, D) = sum_h P_h V_h W_out,h
    h1 = node("Add", [to_f32(o), h32], "h1")  # residual, fp32
    # 2. PreNorm GEGLU feed-forward (value half, exact-erf GELU on the gate half) on the tokens
    #    flattened to (B*T, D), so each half is one Gemm with its bias in the GEMM epilogue
    #    (no separate bias pass, no Split of the (B*T, 8D) activations).
    ln = node("LayerNormalization", [h1, "norm_ff_weight", "norm_ff_bias"], "ln_ff", axis=-1, epsilon=1e-5)
    ln2 = node("Flatten", [to_compute(ln)], "ln_ff_2d", axis=2)  # (B*T, D)
    val = node("Gemm", [ln2, "w_ff_val", "b_ff_val"], "ff_val")  # (B*T, 4D)
    g = node("Gemm", [ln2, "w_ff_gate", "b_ff_gate"], "ff_gate")  # (B*T, 4D)
    half = const("half", 0.5, compute_dtype)
    one = const("one", 1.0, compute_dtype)
    sqrt2 = const("sqrt2", 1.4142135623730951, compute_dtype)
    # Exact erf GELU written as (g * (erf(g / sqrt2) + 1)) * 0.5: the pattern ONNX Runtime
    # and TensorRT fuse into one Gelu kernel, and valid at every opset (Gelu is opset 20).
    erf = node("Erf", [node("Div", [g, sqrt2], "gate_scaled")], "gate_erf")
    gelu = node("Mul", [node("Mul", [g, node("Add", [erf, one], "gate_erf1")], "gate_x_erf1"), half], "gelu")
    bt = node("Shape", ["hidden"], "shape_bt", start=0, end=2)  # [B, T]
    shape_bt_any = node("Concat", [bt, const("minus_one", [-1])], "shape_bt_any", axis=0)
    geglu = node("Reshape", [to_f32(node("Mul", [val, gelu], "geglu_2d")), shape_bt_any], "geglu")  # (B, T, 4D)
    # 3. Masked mean over the pool mask (plain division, as the release) as a batched MatMul
    #    with weights mask / count, of h1 and of the GEGLU activations; ff_out after pooling.
    m = node("Cast", ["pool_mask"], "pool_f32", to=f32)  # (B, T)
    count = node("ReduceSum", [m, axes_last], "pool_count", keepdims=1)  # (B, 1)
    w = node("Unsqueeze", [node("Div", [m, count], "pool_w"), axes_t], "pool_w_b1t")  # (B, 1, T)
    pooled_h = node("Squeeze", [node("MatMul", [w, h1], "pooled_h3"), axes_t], "pooled_h")  # (B, D)
    pooled_g = node("Squeeze", [node("MatMul", [w, geglu], "pooled_g3"), axes_t], "pooled_g")  # (B, 4D)
    ff = node("Add", [to_f32(node("MatMul", [to_compute(pooled_g), "w_ff_out"], "ff_pooled")),
                      to_f32("b_ff_out")], "ff_out")  # (B, D)
    e = node("Add", [pooled_h, ff], "pooled")
    n = node("ReduceL2", [e, axes_last], "norm", keepdims=1)  # (B, 1)
    n = node("Max", [n, const("eps", 1e-12, f32)], "norm_eps")
    node("Div", [e, n], "embeddings")
    return helper.make_function(
        DOMAIN, OP_NAME, ["hidden", "pool_mask", *WEIGHT_INPUTS], ["embeddings"], nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        doc_string="NV-Embed latent-attention head + masked mean + L2 normalise (nvembed-sdk), "
                   "latent K/V, W_q.K, V.W_out and the pooled ff_out folded.",
    )
