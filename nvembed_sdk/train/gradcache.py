"""GradCache: the InfoNCE gradient of a large batch in the memory of a small chunk.

The contrastive loss couples every query with every document, so the batch cannot simply be
split into independent micro-batches (that would change the negatives). GradCache (Gao et al.,
2021; sentence-transformers' ``CachedMultipleNegativesRankingLoss``) splits the work instead:

1. embed all texts chunk by chunk **without** a graph, remembering each chunk's RNG state;
2. compute the loss on those embeddings (as leaf tensors) and backpropagate to them only:
   ``g = dL/de``, one (N, D) tensor, cheap;
3. re-embed each chunk **with** a graph, replaying its RNG state so dropout draws the same
   masks, and call ``e_chunk.backward(g_chunk)``: the chain rule delivers exactly
   ``dL/dtheta`` accumulated over the chunks.

Peak memory is one chunk's activations plus the (N, D) embeddings. The result equals the plain
loss's gradients (``tests/unit/test_train_gradcache.py`` proves it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nvembed_sdk.train.batch import Encoded


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_backward(
    embed: Callable[[Encoded], torch.Tensor],
    sides: list[Encoded],
    loss_fn: Callable[..., torch.Tensor],
    chunk_size: int,
    scale: float = 1.0,
) -> torch.Tensor:
    """Backpropagate ``loss_fn(*embeddings) * scale`` through ``embed`` chunk by chunk.

    Args:
        embed: maps an :class:`Encoded` chunk to (n, D) embeddings (the model, under autocast).
        sides: the inputs, e.g. ``[queries, docs]``; each is embedded in chunks of ``chunk_size`` rows.
        loss_fn: takes one (N_side, D) tensor per side and returns the scalar loss (it may gather
            across ranks).
        chunk_size: rows per forward pass.
        scale: multiplies the loss before backward (1 / gradient-accumulation steps). Defaults to 1.

    Returns:
        The detached loss.
    """
    device = sides[0].input_ids.device
    # 1. Embeddings without a graph, one RNG snapshot per chunk.
    embs, states = [], []
    with torch.no_grad():
        for side in sides:
            parts, side_states = [], []
            for lo in range(0, len(side), chunk_size):
                side_states.append(_rng_state(device))
                parts.append(embed(side.slice(lo, min(lo + chunk_size, len(side)))))
            embs.append(torch.cat(parts).detach().requires_grad_(True))
            states.append(side_states)
    # 2. The loss on the cached embeddings; gradients stop at the embeddings.
    loss = loss_fn(*embs)
    (loss * scale).backward()
    # 3. Replay each chunk with a graph and push the cached gradient through it.
    after = _rng_state(device)
    for side, e, side_states in zip(sides, embs, states, strict=True):
        assert e.grad is not None
        for n, lo in enumerate(range(0, len(side), chunk_size)):
            _set_rng_state(side_states[n], device)
            out = embed(side.slice(lo, min(lo + chunk_size, len(side))))
            out.backward(e.grad[lo : lo + chunk_size])
    _set_rng_state(after, device)  # leave the RNG where the first pass left it
    return loss.detach()


__all__ = ["cached_backward"]
