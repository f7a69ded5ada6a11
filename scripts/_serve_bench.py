"""Shared by serve_load.py and serve_soak.py: texts, a server subprocess on 127.0.0.1, its RSS."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "dev" / "debpkg" / "corpus.jsonl.gz"


def make_texts(tokenizer, n: int, tokens: int = 128, spread: float = 0.25, seed: int = 0) -> list[str]:
    """``n`` texts of about ``tokens`` tokens (+-spread), cut from the dev corpus (or built words)."""
    import random

    rng = random.Random(seed)
    if CORPUS.is_file():
        with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
            words = " ".join(json.loads(line)["text"] for line in fh).split()
    else:
        words = [f"word{i % 997}" for i in range(100_000)]
    out = []
    for _ in range(n):
        want = int(tokens * rng.uniform(1 - spread, 1 + spread))
        start = rng.randrange(0, len(words) - 4 * want)
        best, best_err = "", 1 << 30
        take = want
        for _ in range(12):  # words -> tokens is ~1.3-2 here: a few steps land near `want`
            text = " ".join(words[start : start + take])
            err = len(tokenizer.encode(text).ids) + 1 - want
            if abs(err) < abs(best_err):
                best, best_err = text, err
            if abs(err) <= 3:
                break
            take = max(1, take - (err // 2 if abs(err) > 1 else err))
        text = best
        out.append(text)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: str, port: int, extra: list[str], log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-P", "-m", "nvembed_sdk.cli", "serve", artifact, "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", *extra]
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ})


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> int:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")
