"""Soak: bursts over the queue limit and quiet spells, against ``nvembed serve`` on 127.0.0.1.

A benchmark-style check, not a test. Each request carries texts no other request has; a client
that gets 429 waits ``Retry-After`` and sends the same request again. At the end it checks:

* nothing lost or answered twice: every request id got exactly one 200, the server's
  ``nvembed_requests_total{code="200"}`` equals the client's count, no transport errors, and
  each sampled answer equals in-process ``Embedder.embed`` of that request's own texts;
* memory flat: the server's RSS at the end vs after the first cycle;
* 429s appear in every burst and clear: none in the second half of each quiet spell.

    python scripts/serve_soak.py models/nvembed-debian-small --cycles 4 --burst-s 10 --quiet-s 6
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _serve_bench import free_port, rss_mb, start_server, stop_server, wait_ready  # noqa: E402


def texts_for(i: int, n: int) -> list[str]:
    return [f"request {i} item {j}: package {i * 7 + j} provides tools for data processing and more" * (1 + j % 3)
            for j in range(n)]


class Soak:
    def __init__(self, url: str, texts_per_request: int) -> None:
        self.url = url
        self.n = texts_per_request
        self.ids = itertools.count()
        self.ok: dict[int, list] = {}  # id -> list of 200 bodies' first vectors
        self.events: list[tuple[float, str, int]] = []  # (time, phase, status)
        self.errors: list[str] = []

    async def one(self, client, phase: str) -> None:
        i = next(self.ids)
        body = {"input": texts_for(i, self.n), "encoding_format": "base64"}
        while True:
            try:
                r = await client.post("/v1/embeddings", json=body)
            except Exception as exc:  # noqa: BLE001 - any transport error is a lost request
                self.errors.append(f"{i}: {type(exc).__name__}: {exc}")
                return
            self.events.append((time.time(), phase, r.status_code))
            if r.status_code == 429:
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            if r.status_code != 200:
                self.errors.append(f"{i}: {r.status_code} {r.text[:200]}")
                return
            data = r.json()["data"]
            self.ok.setdefault(i, []).append([d["embedding"] for d in sorted(data, key=lambda d: d["index"])])
            return

    async def phase(self, client, name: str, workers: int, seconds: float) -> None:
        end = time.time() + seconds

        async def loop() -> None:
            while time.time() < end:
                await self.one(client, name)

        await asyncio.gather(*(loop() for _ in range(workers)))


async def run(url: str, args, proc) -> tuple[Soak, list[tuple[float, float]], list[tuple[str, float, float]]]:
    import httpx

    soak = Soak(url, args.texts_per_request)
    rss: list[tuple[float, float]] = []
    spans: list[tuple[str, float, float]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            rss.append((time.time(), rss_mb(proc.pid)))
            await asyncio.sleep(0.5)

    limits = httpx.Limits(max_connections=args.burst_workers + 2)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        sampler = asyncio.create_task(sample())
        for c in range(args.cycles):
            t0 = time.time()
            await soak.phase(client, f"burst{c}", args.burst_workers, args.burst_s)
            spans.append((f"burst{c}", t0, time.time()))
            t0 = time.time()
            await soak.phase(client, f"quiet{c}", 1, args.quiet_s)
            spans.append((f"quiet{c}", t0, time.time()))
            print(f"cycle {c}: {len(soak.ok)} answered, rss {rss[-1][1]:.0f} MB", flush=True)
        stop.set()
        await sampler
        metrics = (await client.get("/metrics")).text
    m = re.search(r'^nvembed_requests_total\{code="200"\} (\S+)', metrics, re.M)
    soak.server_200 = int(float(m.group(1))) if m else -1  # type: ignore[attr-defined]
    return soak, rss, spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--burst-s", type=float, default=10.0)
    ap.add_argument("--quiet-s", type=float, default=6.0)
    ap.add_argument("--burst-workers", type=int, default=24)
    ap.add_argument("--texts-per-request", type=int, default=8)
    ap.add_argument("--max-queue-tokens", type=int, default=4096)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--sample", type=int, default=200, help="answers re-checked against in-process Embedder")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.artifact, port, ["--max-queue-tokens", str(args.max_queue_tokens),
                                              "--max-batch-tokens", str(args.max_batch_tokens)],
                        "/tmp/nvembed-serve-soak.log")
    try:
        wait_ready(url, proc)
        soak, rss, spans = asyncio.run(run(url, args, proc))
    finally:
        rc = stop_server(proc)

    import base64

    import numpy as np

    from nvembed_sdk import Embedder

    sent = next(soak.ids)
    twice = [i for i, v in soak.ok.items() if len(v) != 1]
    lost = sent - len(soak.ok)
    emb = Embedder.load(args.artifact)
    sample = sorted(soak.ok)[:: max(1, len(soak.ok) // args.sample)]
    worst = 1.0
    for i in sample:
        got = np.stack([np.frombuffer(base64.b64decode(e), "<f4") for e in soak.ok[i][0]])
        ref = emb.embed(texts_for(i, args.texts_per_request))
        worst = min(worst, float((got * ref).sum(1).min()))
    per_phase = {}
    for name, t0, t1 in spans:
        codes = [s for t, p, s in soak.events if p == name]
        late = [s for t, p, s in soak.events if p == name and t > (t0 + t1) / 2]
        per_phase[name] = {"requests": len(codes), "429": codes.count(429), "429_second_half": late.count(429)}
    first_cycle_end = spans[1][2]
    base = next((r for t, r in rss if t >= first_cycle_end), rss[0][1])
    end_rss = rss[-1][1]
    bursts = [v for k, v in per_phase.items() if k.startswith("burst")]
    quiets = [v for k, v in per_phase.items() if k.startswith("quiet")]
    result = {
        "sent": sent, "answered_once": len(soak.ok) - len(twice), "answered_twice": len(twice), "lost": lost,
        "transport_or_other_errors": len(soak.errors), "server_200": soak.server_200,
        "client_200": sum(len(v) for v in soak.ok.values()), "sampled": len(sample), "min_cos_vs_embedder": worst,
        "rss_after_cycle0_mb": round(base, 1), "rss_end_mb": round(end_rss, 1),
        "rss_peak_mb": round(max(r for _, r in rss), 1), "phases": per_phase, "server_exit": rc,
    }
    checks = {
        "nothing lost or answered twice": lost == 0 and not twice and not soak.errors
        and result["server_200"] == result["client_200"] == sent,
        "answers are their own texts' vectors": worst >= 0.9999,
        "memory flat (end within 10% or 30 MB of cycle 0)": end_rss - base <= max(30.0, 0.1 * base),
        "429s in every burst": all(b["429"] > 0 for b in bursts),
        "429s clear in every quiet spell": all(q["429_second_half"] == 0 for q in quiets),
        "clean exit after SIGTERM": rc == 0,
    }
    result["checks"] = checks
    print(json.dumps(result, indent=2))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
