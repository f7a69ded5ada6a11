"""Benchmark artifacts side by side in one process, on the same texts (a benchmark, not a test)."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class BenchResult:
    artifact: str
    backend: str
    precision: str
    device: str
    texts_per_s: float
    tokens_per_s: float
    p50_ms: float
    p95_ms: float
    peak_rss_mb: float
    load_s: float
    batches: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _PeakRss:
    """Samples the process RSS every few ms; ``peak - base`` is the artifact's footprint."""

    def __init__(self) -> None:
        self.base = _rss_mb()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def bench_texts(num_texts: int = 256) -> list[str]:
    """Real passages long enough to fill 128 tokens (truncation makes them exactly 128)."""
    from nvembed_sdk.textsets import default_texts

    texts = default_texts("validation", kind="passage") + default_texts("calibration", kind="passage")
    return (texts * (num_texts // max(len(texts), 1) + 1))[:num_texts]


def run_bench(
    artifacts: Sequence[str],
    texts: Sequence[str] | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    repeats: int = 3,
    device: str | None = None,
    options: dict[str, Any] | None = None,
) -> list[BenchResult]:
    """Measure each artifact on the same texts, side by side in this process.

    All artifacts are loaded first (peak memory is measured per artifact over its load and
    warm-up). The timed passes are then interleaved, round-robin, ``repeats`` times, so that
    a slow spell of a shared machine hits every artifact alike; throughput is the median pass.
    Each pass starts after one untimed batch of the same artifact (steady state).

    Args:
        artifacts: paths (checkpoint dirs, bundles, model.onnx, engine.plan).
        texts: texts to embed. Defaults to 256 real passages (truncated to ``max_length``).
        batch_size: texts per batch. Defaults to 32.
        max_length: truncation, i.e. tokens per text for long texts. Defaults to 128.
        repeats: timed passes over the texts per artifact. Defaults to 3.
        device: device for every artifact. Defaults to each backend's choice.
        options: backend options, e.g. ``{"precision": "fp32"}`` or thread counts.

    Returns:
        One :class:`BenchResult` per artifact, in order.
    """
    from nvembed_sdk.embedder import Embedder
    from nvembed_sdk.validate import check_range

    check_range("batch_size", batch_size, 1)
    check_range("max_length", max_length, 2)
    items = list(texts) if texts is not None else bench_texts()
    loaded = []
    for path in artifacts:
        gc.collect()
        with _PeakRss() as mem:
            t0 = time.perf_counter()
            emb = Embedder.load(path, device=device, **_options_for(path, options or {}))
            load_s = time.perf_counter() - t0
            ids = emb.text.tokenize(items, "", max_length)
            batches = [emb.text.collate(ids[lo : lo + batch_size], 0) for lo in range(0, len(ids), batch_size)]
            emb.runner.run(batches[0])  # warm-up
        loaded.append((path, emb, batches, sum(len(r) for r in ids), mem.peak - mem.base, load_s))
    passes: list[list[float]] = [[] for _ in loaded]
    lat: list[list[float]] = [[] for _ in loaded]
    for _ in range(max(1, repeats)):
        for i, (_, emb, batches, _, _, _) in enumerate(loaded):
            # Untimed re-warm: the first batch after another backend ran is slower (the other
            # backend's thread pool and caches; measured +10-80 ms on 2 cores), which a process
            # serving one backend never pays. Steady state is what is reported.
            emb.runner.run(batches[0])
            t_pass = time.perf_counter()
            for batch in batches:
                t = time.perf_counter()
                emb.runner.run(batch)
                lat[i].append(time.perf_counter() - t)
            passes[i].append(time.perf_counter() - t_pass)
    results = []
    for i, (path, emb, _batches, n_tokens, peak, load_s) in enumerate(loaded):
        sec = float(np.median(passes[i]))
        results.append(BenchResult(
            artifact=str(path), backend=emb.backend, precision=emb.precision + (" (emulated)" if emb.emulated else ""),
            device=emb.device, texts_per_s=len(items) / sec, tokens_per_s=n_tokens / sec,
            p50_ms=1000 * float(np.percentile(lat[i], 50)), p95_ms=1000 * float(np.percentile(lat[i], 95)),
            peak_rss_mb=peak, load_s=load_s, batches=len(lat[i]),
        ))
        emb.close()
    return results


def _options_for(path: str, options: dict[str, Any]) -> dict[str, Any]:
    from nvembed_sdk.embedder import detect

    kind = detect(path)[0]
    allowed = {"torch": {"precision"}, "onnxruntime": {"intra_op_num_threads", "inter_op_num_threads", "providers",
                                                       "graph_optimization_level"}, "tensorrt": set()}[kind]
    return {k: v for k, v in options.items() if k in allowed and v is not None}


def format_results(results: Sequence[BenchResult]) -> str:
    """A table with ratios against the first artifact."""
    if not results:
        return "no results"
    base = results[0].texts_per_s
    head = f"{'artifact':<44} {'backend/precision':<26} {'texts/s':>9} {'tokens/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'peak MB':>8} {'ratio':>6}"
    rows = [head, "-" * len(head)]
    for r in results:
        name = r.artifact if len(r.artifact) <= 44 else "..." + r.artifact[-41:]
        rows.append(f"{name:<44} {r.backend + ' ' + r.precision:<26} {r.texts_per_s:>9.1f} {r.tokens_per_s:>10.0f} "
                    f"{r.p50_ms:>8.1f} {r.p95_ms:>8.1f} {r.peak_rss_mb:>8.0f} {r.texts_per_s / base:>5.2f}x")
    return "\n".join(rows)
