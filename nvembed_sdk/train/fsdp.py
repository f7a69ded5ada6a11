"""Sharded full fine-tuning with PyTorch FSDP2 (``fully_shard``), for models whose replicas do not fit.

``"distributed": "fsdp"`` in a stage file, launched with ``torchrun``, shards the parameters,
gradients and AdamW state over the ranks: each decoder layer is one FSDP unit (its weights are
all-gathered for its forward and backward, then freed), the root unit holds the embeddings, the
final norm and the latent head. For the 7.85 B NV-Embed-v2 shape that divides the ~126 GB of fp32
weights + gradients + AdamW moments by the world size.

What stays as in the data-parallel path (``loop.py``): every rank builds the same global batch
and embeds its contiguous shard; embeddings are all-gathered so in-batch negatives span the
global batch; every rank computes the same global loss, whose gradient is the *sum* of the
ranks' gradients. FSDP2 reduce-scatters gradients with a mean by default, so the divide factor
is set to 1 with sum-only collectives (a plain sum), which keeps the data-parallel path's maths. GradCache works as is:
each no-grad pass and each chunk's backward runs the same collectives on every rank because
the shards are equal (``check_config`` asks for a batch divisible by the world size), and the
latent head's inference K/V cache is switched off (see ``shard``).

Checkpoints stay in the released layout: the full state dict is gathered (a collective on every
rank, offloaded to CPU on rank 0) and rank 0 writes it; the optimiser state is gathered as a
full, name-keyed state dict, and on resume every rank reads it and keeps its own shard.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nvembed_sdk.errors import InputError, fmt

MODES = ("ddp", "fsdp")


def check_config(cfg: Any, world: int) -> None:
    """Settings FSDP cannot run with, refused before any weights load.

    Raises:
        InputError: LoRA (use the data-parallel default), dev eval or token-embedding init
            (they need the whole model on one rank), one rank, or a batch the ranks cannot share equally.
    """
    micro = cfg.batch_size // cfg.grad_accum_steps
    checks = [
        (world >= 2, "world size", world, "torchrun --nproc-per-node N (N >= 2) for 'fsdp'"),
        (not cfg.lora.enabled, "lora.enabled", True, "'fsdp' is for full fine-tuning; LoRA uses the default 'ddp'"),
        (not cfg.eval.beir_dir, "eval.beir_dir", cfg.eval.beir_dir,
         "no periodic eval under 'fsdp'; score final/ with `nvembed eval` afterwards"),
        (not cfg.distill.init_token_embeddings, "distill.init_token_embeddings", True, "not with 'fsdp' (a small-model option)"),
        (micro % world == 0, "batch_size / grad_accum_steps", micro,
         f"divisible by the world size {world}, so every rank runs the same collectives"),
    ]
    for ok, name, got, expected in checks:
        if not ok:
            raise InputError(fmt(f"train config {name} with distributed 'fsdp'", got, expected))


def shard(model: nn.Module) -> nn.Module:
    """Apply ``fully_shard`` per decoder layer and at the root (in place); returns the model."""
    from torch.distributed.fsdp import fully_shard

    units = [*model.decoder.layers, model]
    for unit in units:
        fully_shard(unit)
    # The loss is global and each rank's gradient a partial sum of it: reduce with a sum, not a
    # mean, in every unit (the setters act on one unit's parameters only). Factor 1 alone becomes
    # ReduceOp.PREMUL_SUM, which gloo refuses ("Cannot use ReduceOp.PREMUL_SUM with Gloo");
    # sum-only comms give a plain SUM on gloo and NCCL.
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    # The latent head caches its K/V under no_grad, keyed on the parameters' id and version. FSDP2
    # all-gathers into the same unsharded parameter objects and keeps their version counters, so
    # after an optimiser step the key still matched and GradCache's no-grad pass used the old K/V
    # (measured: outputs off by 4e-3 after one step, grad-mode forwards exact). Sharded: no cache.
    model.head.latent_kv = model.head.compute_kv
    return model


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient norm over the sharded gradients (DTensors), clipped like the DDP path."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class FullView:
    """What ``save_model`` reads (``cfg``, ``named_parameters``, ``parameters``) over gathered weights."""

    def __init__(self, cfg: Any, params: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self._params = params

    def named_parameters(self):
        return iter(self._params.items())

    def parameters(self):
        return iter(self._params.values())


def gather(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> tuple[FullView | None, dict | None]:
    """Full weights (and optimiser state) on rank 0; a collective every rank must call.

    Returns:
        ``(view, optimizer_state)`` on rank 0, ``(None, None)`` elsewhere.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    osd = get_optimizer_state_dict(model, opt, options=options) if opt is not None else None
    if dist.get_rank() != 0:
        return None, None
    names = [n for n, _ in model.named_parameters()]
    return FullView(model.cfg, {n: state[n] for n in names}), osd


def load_optimizer(model: nn.Module, opt: torch.optim.Optimizer, full_state: dict) -> None:
    """Load a gathered (full, name-keyed) optimiser state; each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, full_state, options=StateDictOptions(full_state_dict=True))


__all__ = ["MODES", "FullView", "check_config", "clip_grad_norm", "gather", "load_optimizer", "shard"]
