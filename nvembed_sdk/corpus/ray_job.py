"""The corpus job on Ray Data: a CPU stage of tasks, then an actor pool of embedding workers.

::

    parts still to do (one row each) ──► map_batches(tokenise)      CPU tasks: read the part, tokenise
                                              │                      with the artifact's TextPipeline,
                                              ▼                      sort longest first (one row = one part)
                                         map_batches(_EmbedActor)   actor pool (--workers N, --gpus-per-worker):
                                              │                      one Embedder each, model batches of
                                              ▼                      --batch-size, writes part-N.parquet
                                         summaries ──► driver: progress bar, then the final index

A tokenised part travels as one row, so Ray never splits a part between two workers and each
part file is written whole by one actor. Parts already in OUTPUT are not submitted. Every
worker writes to OUTPUT directly: on several machines it must be a shared filesystem.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from nvembed_sdk.corpus.job import CorpusJob, PartEmbedder, artifact_sha256, plan, tokenize_part
from nvembed_sdk.corpus.source import Part
from nvembed_sdk.corpus.store import finalize
from nvembed_sdk.errors import InputError, fmt


def _require_ray():
    from nvembed_sdk._optional import require

    require("pyarrow")
    return require("ray")


def _tokenize_batch(batch: Any, job: CorpusJob) -> Any:
    """Ray Data CPU stage: one input row per part in, one tokenised row per part out (pyarrow)."""
    import pyarrow as pa

    recs = [tokenize_part(job, Part.from_dict(json.loads(s))) for s in batch.column("part").to_pylist()]
    return pa.table({
        "part": pa.array([json.dumps(r["part"]) for r in recs], type=pa.string()),
        "ids": pa.array([r["ids"] for r in recs], type=pa.list_(pa.string())),
        "tokens": pa.array([r["tokens"] for r in recs], type=pa.list_(pa.list_(pa.int32()))),
        "pos": pa.array([r["pos"].tolist() for r in recs], type=pa.list_(pa.int64())),
        "pool_start": pa.array([r["pool_start"] for r in recs], type=pa.int32()),
        "limit": pa.array([r["limit"] for r in recs], type=pa.int32()),
    })


class _EmbedActor:
    """One embedding worker of the pool: loads the artifact once, then embeds and writes parts."""

    def __init__(self, job: CorpusJob, threads: int, sha256: str) -> None:
        import torch

        torch.set_num_threads(threads)
        self.worker = PartEmbedder(job, sha256=sha256)

    def __call__(self, batch: Any) -> Any:
        import os

        import pyarrow as pa

        out = []
        for row in batch.to_pylist():
            rec = {**row, "part": json.loads(row["part"])}
            out.append({**self.worker(rec), "pid": os.getpid()})
        return pa.Table.from_pylist(out)


def connect(address: str | None = None, **init_kwargs: Any) -> dict[str, Any]:
    """Join the Ray cluster at ``address`` (None: ``RAY_ADDRESS``, a cluster running on this
    machine, or a new local one), unless this process already has. Returns the cluster's resources."""
    ray = _require_ray()
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, **init_kwargs)
    return dict(ray.cluster_resources())


def worker_resources(resources: dict[str, Any], workers: int, gpus_per_worker: float, cpus_per_worker: float | None,
                     tokenize_cpus: float) -> float:
    """CPUs each embedding worker asks for, checked against the cluster.

    The tokenise tasks need CPU left over: with every CPU held by actors they never run and
    the job hangs (Ray Data reports ``budget cpu=0``), so the default fits the workers into
    the CPUs minus one tokenise task on a CPU-only cluster.

    Raises:
        InputError: the pool does not fit.
    """
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if workers < 1:
        raise InputError(fmt("--workers", workers, "an int >= 1"))
    if gpus_per_worker > 0 and workers * gpus_per_worker > gpus:
        raise InputError(fmt("--workers x --gpus-per-worker", workers * gpus_per_worker,
                             f"at most the cluster's {gpus:g} GPUs"))
    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if gpus_per_worker > 0 else min(1.0, (cpus - tokenize_cpus) / workers)
    if cpus_per_worker <= 0 or workers * cpus_per_worker + tokenize_cpus > cpus + 1e-9:
        raise InputError(fmt("embedding workers", f"{workers} x {cpus_per_worker:g} CPUs + {tokenize_cpus:g} "
                             f"for tokenising on a cluster of {cpus:g} CPUs",
                             "fewer --workers or a smaller --cpus-per-worker (the tokenise stage needs CPU too)"))
    return float(cpus_per_worker)


def run_ray(job: CorpusJob, address: str | None = None, workers: int = 1, gpus_per_worker: float = 0.0,
            cpus_per_worker: float | None = None, tokenize_cpus: float = 0.25, show_progress: bool = True,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Embed the corpus on a Ray cluster, skipping parts already in ``job.output``.

    Args:
        job: the settings.
        address: the cluster (``ray://host:10001``, ``host:6379``, ``auto``). Defaults to None
            (``RAY_ADDRESS``, a cluster running here, or a new local one).
        workers: embedding actors, one :class:`Embedder` each. Defaults to 1.
        gpus_per_worker: GPUs each actor holds (fractions share a GPU). Defaults to 0.
        cpus_per_worker: CPUs each actor holds. Defaults to 1 with GPUs; on a CPU-only cluster,
            what fits beside one tokenise task (at most 1).
        tokenize_cpus: CPUs per tokenise task. Defaults to 0.25.
        show_progress: a bar over texts. Defaults to True.
        log: one line at a time. Defaults to print.

    Returns:
        The written ``_index.json`` plus ``{"seconds", "texts_per_s", "embedded", "workers"}``.
    """
    ray = _require_ray()
    job = job.absolute()
    t_connect = time.perf_counter()
    resources = connect(address)
    cpus = worker_resources(resources, workers, gpus_per_worker, cpus_per_worker, tokenize_cpus)
    t0 = time.perf_counter()
    parts, todo = plan(job)
    rows = sum(p.rows for p in todo)
    log(f"{len(parts)} parts, {len(parts) - len(todo)} already done; embedding {rows:,} texts on Ray "
        f"({workers} workers x {cpus:g} CPU, {gpus_per_worker:g} GPU; cluster {resources.get('CPU', 0):g} CPU, "
        f"{resources.get('GPU', 0):g} GPU)")
    pids: set[int] = set()
    if todo:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver's own bar counts texts
        threads = job.num_threads or max(1, round(cpus))
        ds = ray.data.from_items([{"part": json.dumps(p.to_dict())} for p in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(_tokenize_batch, fn_kwargs={"job": job}, batch_size=1, batch_format="pyarrow",
                            num_cpus=tokenize_cpus)
        actor_args = {"job": job, "threads": threads, "sha256": artifact_sha256(job.artifact)}
        ds = ds.map_batches(_EmbedActor, fn_constructor_kwargs=actor_args, batch_size=1, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
                            num_gpus=gpus_per_worker or None)
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            total = sum(p.rows for p in parts)
            bar = tqdm(total=total, initial=total - rows, unit="text", desc="embed-corpus (ray)")
        for summary in ds.iter_rows():
            pids.add(int(summary["pid"]))
            if bar is not None:
                bar.update(int(summary["rows"]))
        if bar is not None:
            bar.close()
    index = finalize(job.output, parts)
    dt = time.perf_counter() - t0
    return {**index, "embedded": rows, "seconds": dt, "texts_per_s": rows / dt if dt > 0 else 0.0,
            "connect_seconds": t0 - t_connect, "workers": workers, "worker_pids": sorted(pids)}


__all__ = ["connect", "run_ray", "worker_resources"]
