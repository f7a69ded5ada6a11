"""embed-corpus on a real local Ray cluster (2 CPUs, 2 embedding workers) against the in-process run.

Real passages (the dev corpus), the shipped model. One cluster for the module: Ray's start is
the slow part. The kill test SIGKILLs the job's driver process at a random point and reruns it.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")

from nvembed_sdk.corpus.job import CorpusJob, run_local  # noqa: E402
from nvembed_sdk.corpus.ray_job import run_ray  # noqa: E402
from nvembed_sdk.corpus.store import INDEX_FILE, read_vectors  # noqa: E402

from conftest import DATA, needs_shared  # noqa: E402

MODEL = Path(__file__).resolve().parents[2] / "models" / "nvembed-debian-small"
N, BLOCK, MAX_LEN = 96, 8, 96  # few short passages: 2 CPUs are shared, the pipeline is what is tested


@pytest.fixture(scope="module")
def cluster():
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    src = DATA / "dev" / "debpkg" / "corpus.jsonl.gz"
    needs_shared(src)
    out = tmp_path_factory.mktemp("corpus") / "passages.jsonl"
    with gzip.open(src, "rt", encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(N)]
    out.write_text("".join(lines), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "vecs"
    run_local(_job(corpus, out), show_progress=False, log=lambda s: None)
    return read_vectors(out)


def _job(corpus: Path, out: Path) -> CorpusJob:
    return CorpusJob(str(corpus), str(MODEL), str(out), id_column="_id", block_size=BLOCK, batch_size=4,
                     max_length=MAX_LEN, num_threads=1)


def _same(got, want) -> None:
    ids, vecs, tokens = got
    ref_ids, ref_vecs, ref_tokens = want
    assert len(ids) == len(set(ids)) == N  # no duplicates, no gaps
    assert set(ids) == set(ref_ids)
    pos = {i: k for k, i in enumerate(ref_ids)}
    order = [pos[i] for i in ids]
    a, b = vecs, ref_vecs[order]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.99999, cos.min()
    assert tokens.tolist() == ref_tokens[order].tolist()


def test_ray_job_equals_the_in_process_job(cluster, corpus, reference, tmp_path):
    summary = run_ray(_job(corpus, tmp_path / "vecs"), workers=2, show_progress=False, log=lambda s: None)
    assert summary["embedded"] == N and len(summary["worker_pids"]) == 2  # both actors embedded parts
    assert summary["worker_pids"] and os.getpid() not in summary["worker_pids"]
    _same(read_vectors(tmp_path / "vecs"), reference)


def test_killed_job_rerun_writes_the_same_set(cluster, corpus, reference, tmp_path):
    out = tmp_path / "vecs"
    n_parts = N // BLOCK
    kill_after = random.Random().randrange(1, n_parts - 1)  # a random point, printed on failure
    cmd = [sys.executable, "-m", "nvembed_sdk.cli", "embed-corpus", str(corpus), "--artifact", str(MODEL),
           "-o", str(out), "--id-column", "_id", "--block-size", str(BLOCK), "--batch-size", "4",
           "--max-length", str(MAX_LEN), "--num-threads", "1", "--ray", cluster, "--workers", "2", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(out.glob("part-*.parquet"))) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray then kills the dead driver's actors; one may still rename the part it was writing.
    # Wait until the set of parts stops changing before counting what the rerun must skip.
    seen, still = -1, time.time()
    while time.time() - still < 5 and time.time() < deadline:
        n = len(list(out.glob("part-*.parquet")))
        if n != seen:
            seen, still = n, time.time()
        time.sleep(0.2)
    done = {p.name: p.stat().st_ino for p in out.glob("part-*.parquet")}
    assert kill_after <= len(done) < n_parts, (kill_after, sorted(done))
    assert not (out / INDEX_FILE).exists()

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["rows"] == N and summary["embedded"] == N - len(done) * BLOCK, (kill_after, summary)
    for name, ino in done.items():  # the parts finished before the kill were skipped, not rewritten
        assert (out / name).stat().st_ino == ino
    _same(read_vectors(out), reference)
