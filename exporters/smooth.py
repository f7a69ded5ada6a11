"""Outlier-safe INT8 (and FP8) for the decoder projections, decided in PyTorch before tracing.

Three steps, all on the fp32 ``NVEmbedModel`` and the calibration batches:

1. :func:`collect_stats`: per input channel absmax of every projection group and a sample of
   input rows. Groups (one static per-tensor activation scale each, since they read one tensor):
   ``qkv`` (q/k/v_proj, reading the attention RMSNorm output), ``o`` (o_proj, reading the
   attention output), ``gate_up`` (gate/up_proj, reading the MLP RMSNorm output), ``down``.
2. :func:`smooth_decoder` (INT8 and FP8, each scored on its own grid): SmoothQuant (Xiao et al.) on every group, folded exactly:
   ``s_j = max|X_j|^a / max|W_:,j|^(1-a)``; input channel j is divided by s_j and weight column j
   multiplied by it. The division lands in the attention RMSNorm weight (qkv), the MLP RMSNorm
   weight (gate_up), the rows of ``v_proj`` (o: the attention output is linear in V; with GQA the
   query heads sharing one K/V head share one s, so s is taken per (K/V head, dim)) and the rows
   of ``up_proj`` (down). The strength ``a`` is chosen per layer and group from a grid (plus
   "no smoothing") by the relative output error of the fake-quantised GEMMs on the sampled rows.
3. :func:`o_input_bounds` / :func:`widen_o_ranges`: the o_proj input (attention output) can
   exceed its calibrated range on unseen text but never the V range; when the simulation misses
   the budget its range is widened towards that bound, by the amount held-out text prefers.
4. :func:`simulate` / :func:`sensitivity` / :func:`choose_fallback`: fake-quantised forward
   passes (per-channel weights, per-tensor static activations, the grids the Q/DQ graph uses) to
   find which projections cost the most and the fewest to keep in high precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nvembed_sdk.text import Batch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
            "up_proj": "gate_up", "down_proj": "down"}
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
QMAX = {"int8": 127.0, "fp8": 448.0}
SAMPLE_ROWS = 1024
O_HEADROOM = (0.25, 0.5, 0.75, 1.0)  # candidates for widen_o_ranges, chosen on held-out text
# E4M3 keeps 3 mantissa bits from 2^-6 to 448 times the scale, so a 2x wider range than calibrated
# costs the small values nothing measurable while unseen text no longer clips Q/K/V.
FP8_ATTENTION_HEADROOM = 2.0


def projections(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the decoder projections in graph order: layer by layer, q k v o gate up down."""
    out = []
    for i, layer in enumerate(model.decoder.layers):
        for p in PROJECTIONS:
            parent = layer.attn if p in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            out.append((f"layers.{i}.{'attn' if parent is layer.attn else 'mlp'}.{p}", getattr(parent, p)))
    return out


def _forward(model: nn.Module, batches: Sequence[Batch], desc: str | None = None) -> torch.Tensor:
    """Embeddings of ``batches``; with ``desc``, a progress bar (lines when not on a terminal) over them."""
    from nvembed_sdk.progress import progress

    items = progress(batches, desc) if desc else batches
    with torch.no_grad():
        return torch.cat([model(*(torch.from_numpy(v) for v in (b.input_ids, b.attention_mask, b.pool_mask)))
                          for b in items])


@dataclass
class GroupStats:
    amax: torch.Tensor  # (C,) per input channel absmax over the calibration tokens
    rows: list[torch.Tensor] = field(default_factory=list)  # sampled input rows, each (n, C)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)[:SAMPLE_ROWS]


def collect_stats(model: nn.Module, batches: Sequence[Batch], sample_rows: int = SAMPLE_ROWS) -> dict[str, GroupStats]:
    """Per (layer, group) input statistics: key ``"{i}.{group}"``."""
    stats: dict[str, GroupStats] = {}
    gen = torch.Generator().manual_seed(0)
    per_batch = max(8, sample_rows // max(1, len(batches)))
    handles = []

    def hook(key: str):
        def fn(_mod: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float().flatten(0, -2)  # (B*T, C)
            amax = x.abs().amax(0)
            st = stats.get(key)
            if st is None:
                st = stats[key] = GroupStats(amax)
            else:
                st.amax = torch.maximum(st.amax, amax)
            idx = torch.randperm(x.shape[0], generator=gen)[:per_batch]
            st.rows.append(x[idx].clone())
        return fn

    def v_hook(key: str):
        def fn(_mod: Any, _args: tuple[Any, ...], out: torch.Tensor) -> None:
            amax = out.detach().float().abs().flatten(0, -2).amax(0)  # (n_kv*hd,) per V channel
            st = stats.get(key)
            stats[key] = GroupStats(amax) if st is None else GroupStats(torch.maximum(st.amax, amax))
        return fn

    for i, layer in enumerate(model.decoder.layers):
        handles.append(layer.attn.v_proj.register_forward_hook(v_hook(f"{i}.v_out")))
        for key, mod in ((f"{i}.qkv", layer.attn.q_proj), (f"{i}.o", layer.attn.o_proj),
                         (f"{i}.gate_up", layer.mlp.gate_proj), (f"{i}.down", layer.mlp.down_proj)):
            handles.append(mod.register_forward_pre_hook(hook(key)))
    try:
        _forward(model, batches, desc="calibrate")
    finally:
        for h in handles:
            h.remove()
    return stats


def fake_quant(x: torch.Tensor, scale: torch.Tensor, precision: str) -> torch.Tensor:
    """Quantise-dequantise with a symmetric scale (broadcast against ``x``)."""
    if precision == "int8":
        return torch.clamp(torch.round(x / scale), -128, 127) * scale
    q = torch.clamp(x / scale, -448.0, 448.0).to(torch.float8_e4m3fn)
    return q.float() * scale


def weight_scale(w: torch.Tensor, precision: str) -> torch.Tensor:
    """Per output channel scale of an ``nn.Linear`` weight (out, in) -> (out, 1)."""
    return (w.abs().amax(1, keepdim=True) / QMAX[precision]).clamp(min=1e-12)


def act_scale(amax: float, precision: str) -> float:
    return max(float(amax), 1e-8) / QMAX[precision]


def _group_error(x: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor, precision: str) -> float:
    xs = x / s  # (n, C)
    xq = fake_quant(xs, torch.tensor(act_scale(xs.abs().max(), precision)), precision)
    err = 0.0
    for w in weights:  # (out, C)
        ref = x @ w.T
        ws = w * s
        wq = fake_quant(ws, weight_scale(ws, precision), precision)
        diff = (xq @ wq.T - ref).pow(2)
        # Whole-tensor relative error plus the mean per-token one: large (outlier) tokens must not
        # hide the small ones, which short texts pool over with nothing to average them out.
        total = float(diff.sum() / ref.pow(2).sum().clamp(min=1e-12))
        per_row = float((diff.sum(1) / ref.pow(2).sum(1).clamp(min=1e-12)).mean())
        err += 0.5 * (total + per_row)
    return err / len(weights)


def _gqa_reduce(v: torch.Tensor, n_head: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """(n_head*hd,) -> (n_kv*hd,) max over the query heads of each K/V head."""
    rep = n_head // n_kv
    return v.view(n_kv, rep, head_dim).amax(1).reshape(-1)


def _gqa_expand(v: torch.Tensor, n_head: int, n_kv: int, head_dim: int) -> torch.Tensor:
    rep = n_head // n_kv
    return v.view(n_kv, 1, head_dim).expand(n_kv, rep, head_dim).reshape(-1)


def smooth_decoder(model: nn.Module, stats: dict[str, GroupStats], precision: str = "int8",
                   alphas: Sequence[float] | None = None) -> dict[str, Any]:
    """SmoothQuant every decoder projection group, folded exactly; strength chosen per layer.

    Args:
        model: fp32 ``NVEmbedModel`` (modified in place: computes the same function).
        stats: :func:`collect_stats` of the unsmoothed model.
        precision: the grid the error is measured on. Defaults to int8.
        alphas: candidate strengths; "no smoothing" is always a candidate too. Defaults to ``ALPHAS``.

    Returns:
        Per ``"{layer}.{group}"``: chosen alpha (None: no smoothing), error before/after, and
        the outlier ratio (largest / median channel absmax) before and after.
    """
    report: dict[str, Any] = {}
    alphas = ALPHAS if alphas is None else alphas
    with torch.no_grad():
        for i, layer in enumerate(model.decoder.layers):
            attn, mlp = layer.attn, layer.mlp
            gqa = (attn.n_head, attn.n_kv, attn.head_dim)
            for group, weights in (("qkv", [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                                   ("o", [attn.o_proj.weight]),
                                   ("gate_up", [mlp.gate_proj.weight, mlp.up_proj.weight]),
                                   ("down", [mlp.down_proj.weight])):
                st = stats[f"{i}.{group}"]
                act = st.amax.clamp(min=1e-5)
                wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)  # (C,)
                if group == "o":  # one s per (K/V head, dim): the rows of v_proj carry it
                    act, wmax = _gqa_reduce(act, *gqa), _gqa_reduce(wmax, *gqa)
                x = st.sample()
                ws = [w.float() for w in weights]
                best_alpha, best_s = None, torch.ones_like(st.amax)
                base = best = _group_error(x, ws, best_s, precision)
                for a in alphas:
                    s = (act.pow(a) / wmax.pow(1.0 - a)).clamp(1e-3, 1e3)
                    if group == "o":
                        s = _gqa_expand(s, *gqa)
                    e = _group_error(x, ws, s, precision)
                    if e < best:
                        best, best_alpha, best_s = e, a, s
                if best_alpha is not None:
                    _fold(layer, group, best_s, gqa)
                    if group == "o":  # V itself is divided by s (per K/V channel): keep its range exact
                        stats[f"{i}.v_out"].amax = stats[f"{i}.v_out"].amax / _gqa_reduce(best_s, *gqa)
                after = st.amax / best_s
                report[f"{i}.{group}"] = {
                    "alpha": best_alpha, "error_before": round(base, 6), "error_after": round(best, 6),
                    "outlier_ratio_before": round(float(st.amax.max() / st.amax.median().clamp(min=1e-8)), 1),
                    "outlier_ratio_after": round(float(after.max() / after.median().clamp(min=1e-8)), 1),
                }
                st.amax = after  # the smoothed model's input absmax (exact: same activations / s)
                st.rows = [r / best_s for r in st.rows]
    return report


def _fold(layer: nn.Module, group: str, s: torch.Tensor, gqa: tuple[int, int, int]) -> None:
    attn, mlp = layer.attn, layer.mlp
    if group == "qkv":
        layer.attn_norm.weight.div_(s)
        for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
            w.mul_(s[None, :])
    elif group == "gate_up":
        layer.mlp_norm.weight.div_(s)
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w.mul_(s[None, :])
    elif group == "o":
        s_kv = _gqa_reduce(s, *gqa)  # s is constant over the query heads of a K/V head
        attn.v_proj.weight.div_(s_kv[:, None])  # (n_kv*hd, D): row c scaled by 1 / s_c
        attn.o_proj.weight.mul_(s[None, :])
    else:  # down: silu(gate) * up is linear in up
        mlp.up_proj.weight.div_(s[:, None])
        mlp.down_proj.weight.mul_(s[None, :])


def activation_amax(model: nn.Module, stats: dict[str, GroupStats]) -> dict[str, float]:
    """Per projection name, the per-tensor absmax of its input (from the group statistics)."""
    return {name: float(stats[f"{name.split('.')[1]}.{GROUP_OF[name.rsplit('.', 1)[1]]}"].amax.max())
            for name, _ in projections(model)}


def o_input_bounds(model: nn.Module, stats: dict[str, GroupStats]) -> dict[str, float]:
    """Per ``o_proj``, the largest value its input can take on any text: the calibrated V range.

    The attention output of a query head is a convex combination of the V rows of its K/V head
    (softmax weights are >= 0 and sum to 1), so ``|o_in[c]| <= max_t |V[t, c]|`` for every token,
    text and length. V is a per-token projection, so its calibrated range holds for unseen text;
    the o_proj input's own calibrated range does not: a text whose V rows agree (a repeated
    token, a uniform attention map over a long run) keeps the mean at the V scale, while on
    typical long text the mean shrinks, so calibration on a few texts under-estimates it.
    """
    return {f"layers.{i}.attn.o_proj": float(stats[f"{i}.v_out"].amax.max()) for i in range(len(model.decoder.layers))}


def widen_o_ranges(amax: dict[str, float], bounds: dict[str, float], r: float) -> dict[str, float]:
    """``amax`` with each o_proj range moved geometrically towards its no-clip bound (r=0: calibrated, 1: bound)."""
    out = dict(amax)
    for name, bound in bounds.items():
        lo = amax[name]
        out[name] = lo * max(bound / lo, 1.0) ** r if lo > 0 else bound
    return out


@contextmanager
def _bmm_hooks(model: nn.Module, make: Callable[[int], Any]) -> Iterator[None]:
    """Every layer on the explicit attention path with ``bmm_quant = make(layer)`` (restored after)."""
    attns = [layer.attn for layer in model.decoder.layers]
    saved = [(a.explicit_attention, a.bmm_quant) for a in attns]
    try:
        for i, a in enumerate(attns):
            a.explicit_attention, a.bmm_quant = True, make(i)
        yield
    finally:
        for a, (explicit, hook) in zip(attns, saved, strict=True):
            a.explicit_attention, a.bmm_quant = explicit, hook


def attention_amax(model: nn.Module, batches: Sequence[Batch]) -> list[dict[str, float]]:
    """Per layer, the per-tensor ranges of the attention BMM operands for FP8 Q/DQ.

    ``q``/``k`` (after RoPE) and ``v``: calibrated absmax times ``FP8_ATTENTION_HEADROOM``;
    ``p`` (softmax output): 1, its bound; ``out`` (P @ V, the attention output): the V range,
    its bound (a convex combination of V rows).
    """
    seen = [dict.fromkeys(("q", "k", "v"), 0.0) for _ in model.decoder.layers]

    def make(i: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
        def fn(name: str, t: torch.Tensor) -> torch.Tensor:
            if name in seen[i]:
                seen[i][name] = max(seen[i][name], float(t.detach().abs().max()))
            return t
        return fn

    with _bmm_hooks(model, make):
        _forward(model, batches)
    h = FP8_ATTENTION_HEADROOM
    return [{"q": r["q"] * h, "k": r["k"] * h, "v": r["v"] * h, "p": 1.0, "out": r["v"] * h} for r in seen]


def simulate(model: nn.Module, batches: Sequence[Batch], amax: dict[str, float], precision: str,
             keep: set[str] | frozenset[str] = frozenset(),
             attention: Sequence[dict[str, float]] | None = None) -> torch.Tensor:
    """Embeddings with every projection not in ``keep`` fake-quantised (weights and input).

    ``attention`` (from :func:`attention_amax`): the attention BMM operands fake-quantised to FP8 too.
    """
    if attention is not None:
        def make(i: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
            def fn(name: str, t: torch.Tensor) -> torch.Tensor:
                return fake_quant(t, torch.tensor(act_scale(attention[i][name], "fp8")), "fp8")
            return fn

        with _bmm_hooks(model, make):
            return simulate(model, batches, amax, precision, keep)
    saved, handles = {}, []
    try:
        for name, lin in projections(model):
            if name in keep:
                continue
            saved[name] = lin.weight.data
            w = lin.weight.data.float()
            lin.weight.data = fake_quant(w, weight_scale(w, precision), precision).to(w.dtype)
            scale = torch.tensor(act_scale(amax[name], precision))

            def pre(_m: Any, args: tuple[Any, ...], scale: torch.Tensor = scale) -> tuple[Any, ...]:
                return (fake_quant(args[0], scale, precision),)
            handles.append(lin.register_forward_pre_hook(pre))
        return _forward(model, batches)
    finally:
        for h in handles:
            h.remove()
        for name, lin in projections(model):
            if name in saved:
                lin.weight.data = saved[name]


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


def sensitivity(model: nn.Module, batches: Sequence[Batch], reference: torch.Tensor, amax: dict[str, float],
                precision: str) -> tuple[float, list[dict[str, Any]]]:
    """(min cosine with everything quantised, per projection: min cosine when only it is kept high precision).

    Sorted costliest first (largest gain from keeping it).
    """
    base = min_cosine(simulate(model, batches, amax, precision), reference)
    rows = []
    for name, _ in projections(model):
        kept = min_cosine(simulate(model, batches, amax, precision, {name}), reference)
        rows.append({"projection": name, "min_cosine_if_kept": round(kept, 5), "gain": round(kept - base, 5)})
    rows.sort(key=lambda r: -r["gain"])
    return base, rows


def choose_fallback(model: nn.Module, batches: Sequence[Batch], reference: torch.Tensor, amax: dict[str, float],
                    precision: str, ranking: Sequence[dict[str, Any]], target: float) -> tuple[list[str], float]:
    """Keep the costliest projections in high precision: the shortest prefix of ``ranking`` that meets ``target``.

    The prefix length is bisected (about log2(n) simulations, not n): keeping every projection is
    the fp32 model itself (min cosine 1.0), so a prefix that meets ``target`` always exists, and the
    one returned meets it; it is the shortest when keeping more never hurts. A model whose error is
    spread over every projection (a random-weight one) may keep most of them: the caller reports
    the share of MACs left quantised.

    Returns:
        (kept projection names, costliest first; simulated min cosine with them kept).
    """
    names = [r["projection"] for r in ranking]

    def cos_at(k: int) -> float:
        return min_cosine(simulate(model, batches, amax, precision, set(names[:k])), reference)

    lo, hi, best = 0, len(names), 1.0  # cos_at(lo) < target (the caller's simulation missed); cos_at(hi) = 1.0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = cos_at(mid)
        if c >= target:
            hi, best = mid, c
        else:
            lo = mid
    return names[:hi], best
