"""Ray Data corpus job vs the in-process job on the same cores, measured in one run.

Embeds the same passages twice with the same artifact: in-process (one Embedder, ``--cpus``
torch threads) and on a local Ray cluster started with ``num_cpus=--cpus`` (``--workers``
actors, one thread each when the CPUs allow no more). Prints texts/s of each (model load
included in both; the cluster's start is printed apart), the ratio, and the vectors' agreement
(same ids, min cosine). On 2 CPU cores this shows Ray's overhead, not a speed-up.

Example (the issue's figure: 5,000 real passages, 2 workers on 2 cores)::

    python scripts/bench_corpus.py --passages 5000 --workers 2 --cpus 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


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

    def local_run() -> dict:
        return run_local(CorpusJob(**common, output=str(work / "local"), num_threads=args.cpus), show_progress=False,
                         log=lambda s: None)

    def ray_job() -> tuple[dict, float]:
        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter() - t
        res = run_ray(CorpusJob(**common, output=str(work / "ray"), num_threads=max(1, args.cpus // args.workers)),
                      workers=args.workers, show_progress=False, log=lambda s: None)
        ray.shutdown()
        return res, start

    if args.local_first:
        local = local_run()
        ray_run, ray_start = ray_job()
    else:
        ray_run, ray_start = ray_job()
        local = local_run()

    a_ids, a, _ = read_vectors(work / "local")
    b_ids, b, _ = read_vectors(work / "ray")
    pos = {i: k for k, i in enumerate(a_ids)}
    order = [pos[i] for i in b_ids]
    cos = (b * a[order]).sum(1) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a[order], axis=1))
    result = {"passages": n, "cpus": args.cpus, "order": "local, ray" if args.local_first else "ray, local", "workers": args.workers, "block_size": args.block_size,
              "batch_size": args.batch_size,
              "in_process_texts_per_s": round(local["texts_per_s"], 2), "in_process_seconds": round(local["seconds"], 1),
              "ray_texts_per_s": round(ray_run["texts_per_s"], 2), "ray_seconds": round(ray_run["seconds"], 1),
              "ray_cluster_start_seconds": round(ray_start, 1),
              "ray_vs_in_process": round(ray_run["texts_per_s"] / local["texts_per_s"], 3),
              "same_ids": sorted(a_ids) == sorted(b_ids) and len(set(b_ids)) == len(b_ids) == n,
              "min_cosine": float(cos.min())}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{n:,} passages, {args.cpus} CPUs, artifact {args.artifact} (order: {result['order']})")
    print(f"  in-process : {result['in_process_texts_per_s']:8.2f} texts/s ({result['in_process_seconds']}s, "
          f"{args.cpus} torch threads)")
    print(f"  Ray Data   : {result['ray_texts_per_s']:8.2f} texts/s ({result['ray_seconds']}s, {args.workers} workers; "
          f"cluster start {result['ray_cluster_start_seconds']}s not counted)")
    print(f"  Ray / in-process: {result['ray_vs_in_process']:.1%}   same ids: {result['same_ids']}   "
          f"min cosine: {result['min_cosine']:.7f}")


if __name__ == "__main__":
    main()
