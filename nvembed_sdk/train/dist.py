"""Ranks under torchrun: who is main, gathering embeddings, summing gradients.

Every rank builds the same global batch and embeds its contiguous shard; :meth:`Dist.gather`
returns every rank's rows with only the local ones carrying a graph, so in-batch negatives span
the global batch and every rank computes the same global loss; summing the ranks' gradients
(:meth:`Dist.sum_grads`) then gives exactly that loss's gradient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' (n, D) rows, rank-major; the local rows keep their graph (the others are
        constants here: their own rank differentiates them)."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[self.rank] = x
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def setup_dist() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_dist() -> None:
    """End the process group a torchrun rank opened, after every rank got here: a rank that
    exits with gloo's threads still live can abort ("terminate called without an active
    exception", exit -6) after training finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_rank(code: int = 0) -> None:
    """End a finished torchrun rank now, skipping the interpreter's teardown.

    Even after :func:`shutdown_dist`, a gloo rank can still abort while the interpreter tears down
    torch's C++ state ("terminate called without an active exception", exit -6: seen in CI after a
    run that had written its final model), and torchrun then reports the whole job failed. Everything
    the run writes is on disk and renamed into place by now, so the rank flushes its streams and
    logging and leaves with ``os._exit``.
    """
    import contextlib
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream has nothing left to lose
            stream.flush()
    os._exit(code)


__all__ = ["Dist", "exit_rank", "setup_dist", "shutdown_dist"]
