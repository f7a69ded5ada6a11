"""Ray Data corpus job vs the in-process job on the same cores, measured in one run.

Embeds the same passages twice with the same artifact: in-process (one Embedder, ``--cpus``
torch threads) and on a local Ray cluster started with ``num_cpus=--cpus`` (``--workers``
actors, one thread each when the CPUs allow no more). Prints texts/s of each (model load
included in both; the cluster's start is printed apart), the ratio, and the vectors' agreement
(same ids, min cosine). On 2 CPU cores this shows Ray's overhead, not a speed-up.

Wall-clock texts/s only compares the two halves when nothing else competes for the cores: on a
shared machine each half gets whatever CPU share the scheduler leaves it. So each half also
records the load average and the CPU seconds its process tree used (this process, plus Ray's
processes for the Ray half), and prints texts per CPU-second and the cores each half actually
got; a Ray/in-process ratio far from 1 with very different "cores used" is the machine, not Ray.
The run exits 1 if the two outputs differ (other ids, a duplicate, or min cosine < 0.99999).

Example (the issue's figure: 5,000 real passages, 2 workers on 2 cores)::

    python scripts/bench_corpus.py --passages 5000 --workers 2 --cpus 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIN_COSINE = 0.99999


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds of its own threads) for every process (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as fh:
                f = fh.read().rsplit(b")", 1)[1].split()  # after the (comm), which may hold spaces
        except OSError:
            continue  # exited meanwhile
        out[int(d)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick)  # ppid; utime + stime
    return out


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of ``root`` and of each of its live descendants, by pid."""
    stats = _proc_stats()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = stats[pid][1]
            todo += kids.get(pid, [])
    return out


class Half:
    """Wall seconds, CPU seconds of this process tree, and load averages around one half.

    The tree (this process; for the Ray half also Ray's GCS, raylet and workers, which the
    raylet starts) is sampled every ``period`` s and each process counted at its last sample:
    Ray's workers exit unreaped-into-anyone's-rusage, so a process that ends loses at most
    ``period`` s of CPU. Without /proc (not Linux) ``cpu`` is None.
    """

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.cpu: float | None = None

    def _sample(self) -> None:
        for pid, sec in tree_cpu(os.getpid()).items():
            self.last[pid] = sec

    def _loop(self) -> None:
        while not self.done.wait(self.period):
            self._sample()

    def __enter__(self) -> Half:
        import threading

        self.load0 = os.getloadavg()[0]
        self.proc = os.path.isdir("/proc")
        self.base = tree_cpu(os.getpid()) if self.proc else {}
        self.last = dict(self.base)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True) if self.proc else None
        if self.thread is not None:
            self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def stop(self) -> None:
        """End the half (call before ray.shutdown, while Ray's processes exist)."""
        if hasattr(self, "wall"):
            return
        self.wall = time.perf_counter() - self.t0
        self.done.set()
        if self.thread is not None:
            self.thread.join()
            self._sample()
            self.cpu = sum(sec - self.base.get(pid, 0.0) for pid, sec in self.last.items())
        self.load1 = os.getloadavg()[0]

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=str(ROOT.parent / "shared/data/dev/debpkg/corpus.jsonl.gz"),
                    help="JSONL(.gz) corpus. Default: the dev corpus (5,879 Debian package descriptions).")
    ap.add_argument("--id-column", default="_id")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--passages", type=int, default=5000, help="First N passages of the input.")
    ap.add_argument("--artifact", default=str(ROOT / "models/nvembed-debian-small"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="Cores for both runs (torch threads / Ray num_cpus).")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--local-first", action="store_true", help="Run the in-process job first (default: Ray first).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import ray

    from nvembed_sdk.corpus.job import CorpusJob, run_local
    from nvembed_sdk.corpus.ray_job import run_ray
    from nvembed_sdk.corpus.store import read_vectors

    work = Path(tempfile.mkdtemp(prefix="bench_corpus_"))
    src = work / "passages.jsonl"
    opener = gzip.open if args.input.endswith(".gz") else open
    with opener(args.input, "rt", encoding="utf-8") as fh, open(src, "w", encoding="utf-8") as out:
        n = 0
        for line in fh:
            if line.strip() and n < args.passages:
                out.write(line)
                n += 1
    common = {"input": str(src), "artifact": args.artifact, "id_column": args.id_column,
              "text_column": args.text_column, "block_size": args.block_size, "batch_size": args.batch_size,
              "max_length": args.max_length}

    def local_run() -> tuple[dict, Half]:
        with Half() as h:
            res = run_local(CorpusJob(**common, output=str(work / "local"), num_threads=args.cpus),
                            show_progress=False, log=lambda s: None)
        return res, h

    def ray_job() -> tuple[dict, float, Half]:
        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter() - t
        with Half() as h:
            res = run_ray(CorpusJob(**common, output=str(work / "ray"), num_threads=max(1, args.cpus // args.workers)),
                          workers=args.workers, show_progress=False, log=lambda s: None)
            h.stop()  # Ray's processes still exist: their CPU is counted
        ray.shutdown()
        return res, start, h

    if args.local_first:
        local, local_h = local_run()
        ray_run, ray_start, ray_h = ray_job()
    else:
        ray_run, ray_start, ray_h = ray_job()
        local, local_h = local_run()

    a_ids, a, _ = read_vectors(work / "local")
    b_ids, b, _ = read_vectors(work / "ray")
    pos = {i: k for k, i in enumerate(a_ids)}
    shared = [k for k, i in enumerate(b_ids) if i in pos]  # ids in both (same_ids below says if all are)
    order = [pos[b_ids[k]] for k in shared]
    b = b[shared]
    cos = (b * a[order]).sum(1) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a[order], axis=1))
    result = {"passages": n, "cpus": args.cpus, "order": "local, ray" if args.local_first else "ray, local", "workers": args.workers, "block_size": args.block_size,
              "batch_size": args.batch_size,
              "in_process_texts_per_s": round(local["texts_per_s"], 2), "in_process_seconds": round(local["seconds"], 1),
              "ray_texts_per_s": round(ray_run["texts_per_s"], 2), "ray_seconds": round(ray_run["seconds"], 1),
              "ray_cluster_start_seconds": round(ray_start, 1),
              "ray_vs_in_process": round(ray_run["texts_per_s"] / local["texts_per_s"], 3),
              "same_ids": sorted(a_ids) == sorted(b_ids) and len(set(b_ids)) == len(b_ids) == n,
              "min_cosine": float(cos.min()) if len(cos) else 0.0}
    for name, h, res in (("in_process", local_h, local), ("ray", ray_h, ray_run)):
        result[f"{name}_cpu_seconds"] = None if h.cpu is None else round(h.cpu, 1)
        result[f"{name}_cores_used"] = None if h.cpu is None else round(h.cpu / h.wall, 2)
        result[f"{name}_texts_per_cpu_s"] = round(res["embedded"] / h.cpu, 3) if h.cpu else None
        result[f"{name}_load_avg"] = [round(h.load0, 1), round(h.load1, 1)]
    if result["in_process_texts_per_cpu_s"] and result["ray_texts_per_cpu_s"]:
        result["ray_vs_in_process_per_cpu_s"] = round(result["ray_texts_per_cpu_s"] / result["in_process_texts_per_cpu_s"], 3)
    ok = result["same_ids"] and result["min_cosine"] >= MIN_COSINE
    if args.json:
        print(json.dumps(result))
        sys.exit(0 if ok else 1)
    print(f"{n:,} passages, {args.cpus} CPUs, artifact {args.artifact} (order: {result['order']})")
    print(f"  in-process : {result['in_process_texts_per_s']:8.2f} texts/s ({result['in_process_seconds']}s, "
          f"{args.cpus} torch threads)")
    print(f"  Ray Data   : {result['ray_texts_per_s']:8.2f} texts/s ({result['ray_seconds']}s, {args.workers} workers; "
          f"cluster start {result['ray_cluster_start_seconds']}s not counted)")
    print(f"  Ray / in-process: {result['ray_vs_in_process']:.1%}   same ids: {result['same_ids']}   "
          f"min cosine: {result['min_cosine']:.7f}")
    for name in ("in_process", "ray"):
        print(f"  {name:10s} : {result[f'{name}_cpu_seconds']} CPU s, {result[f'{name}_cores_used']} cores used, "
              f"{result[f'{name}_texts_per_cpu_s']} texts per CPU s, load average {result[f'{name}_load_avg']}")
    if "ray_vs_in_process_per_cpu_s" in result:
        print(f"  Ray / in-process per CPU second: {result['ray_vs_in_process_per_cpu_s']:.1%} "
              "(wall-clock ratios need an idle machine; this one is less sensitive to load)")
    if not ok:
        print(f"  FAIL: the Ray output differs from the in-process output (min cosine < {MIN_COSINE} or other ids)")
        sys.exit(1)


if __name__ == "__main__":
    main()
