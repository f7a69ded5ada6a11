"""Load test: ``nvembed serve`` at saturation vs in-process ``Embedder.embed``, one run, same texts.

A benchmark, not a test. Bounded: 127.0.0.1 only, a fixed number of requests. Mixed requests
(1 to 64 texts each, texts of ~128 tokens) from many concurrent connections (base64 answers,
as the openai client asks). Prints throughput, p50/p99 latency and the ratio

    served texts/s / in-process Embedder.embed texts/s

with the in-process figure measured before and after the server phase (the mean is the
denominator; the two show how much the shared CPU drifted during the run).

    python scripts/serve_load.py /tmp/i14-int8 --requests 300 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _serve_bench import free_port, make_texts, percentile, rss_mb, start_server, stop_server, wait_ready  # noqa: E402

SIZES = (1, 2, 4, 8, 16, 32, 64)  # texts per request: short and long requests mixed


def in_process(artifact: str, texts: list[str], batch_size: int, backend_opts: dict) -> float:
    from nvembed_sdk import Embedder

    emb = Embedder.load(artifact, **backend_opts)
    emb.embed(texts[:batch_size], batch_size=batch_size)  # untimed warm-up
    t0 = time.perf_counter()
    emb.embed(texts, batch_size=batch_size)
    rate = len(texts) / (time.perf_counter() - t0)
    emb.close()
    del emb
    gc.collect()
    return rate


async def drive(url: str, requests: list[list[str]], concurrency: int, model: str) -> tuple[float, list[float], dict]:
    import httpx

    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    latencies: list[float] = []
    codes: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

        async def worker() -> None:
            while not queue.empty():
                texts = queue.get_nowait()
                while True:
                    t0 = time.perf_counter()
                    r = await client.post("/v1/embeddings", json={"input": texts, "model": model,
                                                                  "encoding_format": "base64"})
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code != 429:
                        break
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
                assert len(r.json()["data"]) == len(texts)
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return wall, latencies, codes


def scrape(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("nvembed_") and ("{" not in line or line.startswith("nvembed_batch_size_bucket")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def in_process_padding(texts: list[str], tokenizer, batch_size: int) -> float:
    lengths = sorted((len(tokenizer.encode(t).ids) + 1 for t in texts), reverse=True)
    padded = sum(len(lengths[i : i + batch_size]) * lengths[i] for i in range(0, len(lengths), batch_size))
    return sum(lengths) / padded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--requests", type=int, default=300, help="fixed request count (bounded)")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent connections")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per text (about)")
    ap.add_argument("--batch-size", type=int, default=64, help="in-process batch size = server --max-batch-requests")
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `nvembed serve` option (repeatable)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from tokenizers import Tokenizer

    tok_dir = Path(args.artifact) if Path(args.artifact).is_dir() else Path(args.artifact).parent
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    rng = random.Random(args.seed)
    sizes = [rng.choice(SIZES) for _ in range(args.requests)]
    texts = make_texts(tokenizer, sum(sizes), args.tokens, seed=args.seed)
    requests, k = [], 0
    for n in sizes:
        requests.append(texts[k : k + n])
        k += n
    print(f"{len(requests)} requests, {len(texts)} texts of ~{args.tokens} tokens, concurrency {args.concurrency}",
          flush=True)

    print(f"in-process real/padded tokens: {in_process_padding(texts, tokenizer, args.batch_size):.3f}")
    before = in_process(args.artifact, texts, args.batch_size, {})
    print(f"in-process (before): {before:.1f} texts/s", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = "/tmp/nvembed-serve-load.log"
    proc = start_server(args.artifact, port, ["--max-batch-requests", str(args.batch_size), "--max-batch-tokens",
                                              str(args.max_batch_tokens), *args.server_arg], log_path)
    try:
        wait_ready(url, proc)
        model = Path(args.artifact).name if Path(args.artifact).is_dir() else Path(args.artifact).parent.name
        asyncio.run(drive(url, requests[: max(4, args.concurrency // 4)], args.concurrency, model))  # warm
        m0 = scrape(url)
        wall, lat, codes = asyncio.run(drive(url, requests, args.concurrency, model))
        server_rss = rss_mb(proc.pid)
        m1 = scrape(url)
    finally:
        rc = stop_server(proc)
    served = len(texts) / wall

    after = in_process(args.artifact, texts, args.batch_size, {})
    print(f"in-process (after):  {after:.1f} texts/s", flush=True)
    base = (before + after) / 2
    result = {
        "artifact": args.artifact, "requests": len(requests), "texts": len(texts), "tokens_per_text": args.tokens,
        "concurrency": args.concurrency, "served_texts_per_s": round(served, 1),
        "requests_per_s": round(len(requests) / wall, 2), "p50_ms": round(percentile(lat, 50) * 1000, 1),
        "p99_ms": round(percentile(lat, 99) * 1000, 1), "in_process_before": round(before, 1),
        "in_process_after": round(after, 1), "ratio": round(served / base, 3), "status_codes": codes,
        "server_rss_mb": round(server_rss, 1), "server_exit": rc,
    }
    d = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1}
    if d.get("nvembed_batch_size_count"):
        result["server_batches"] = int(d["nvembed_batch_size_count"])
        result["mean_batch_rows"] = round(d["nvembed_batch_size_sum"] / d["nvembed_batch_size_count"], 1)
        result["padding_efficiency"] = round(d["nvembed_prompt_tokens_total"] / d["nvembed_batch_tokens_sum"], 3)
        result["forward_busy"] = round(d["nvembed_forward_seconds_sum"] / wall, 3)
        result["batch_rows_le"] = {k.split('"')[1]: int(v) for k, v in d.items() if k.startswith("nvembed_batch_size_bucket")}
        print(f"server: {result['server_batches']} batches, {result['mean_batch_rows']} rows each, real/padded tokens "
              f"{result['padding_efficiency']}, worker busy {result['forward_busy']:.0%} of the wall time")
    print(f"served: {served:.1f} texts/s ({len(requests) / wall:.1f} req/s), p50 {result['p50_ms']} ms, "
          f"p99 {result['p99_ms']} ms, codes {codes}")
    print(f"ratio served / in-process: {result['ratio']:.3f}  (in-process {before:.1f} -> {after:.1f} texts/s)")
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
