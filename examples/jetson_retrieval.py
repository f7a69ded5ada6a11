"""On-device retrieval with any NV-Embed artifact: index a folder of text files, search it.

The artifact can be a TensorRT engine (``engine.plan`` or its bundle directory), an ONNX bundle
or a checkpoint directory: ``Embedder.load`` picks the backend, so the same commands run on a
Jetson with an engine and on a laptop CPU with a checkpoint or an ONNX bundle.

Files are split into passages at blank lines (long paragraphs are wrapped at ``--chunk-chars``).
Vectors are stored in one ``.npz`` as ``fp16``, or as ``int8`` with a per-vector scale
(``max|v| / 127``); either way the norm of the stored vector is kept, so a search scores the
cosine of the stored vector: ``score = (stored . q) * scale / norm``. Search is exact top-k by
inner product over blocks of rows (bounded memory).

Commands (run from the repository root):

    # On the Jetson, with an engine built there (docs/jetson.md):
    python examples/jetson_retrieval.py index --model out/trt-int8/engine.plan \\
        --docs ~/manuals --index manuals.npz --dtype int8
    python examples/jetson_retrieval.py search --model out/trt-int8/engine.plan \\
        --index manuals.npz -k 5 --query "how do I flash the board?" --query "fan speed"

    # Anywhere (CPU is fine), with a checkpoint or an ONNX bundle:
    python examples/jetson_retrieval.py index --model out/onnx --docs DIR --index idx.npz --dtype fp16
    python examples/jetson_retrieval.py search --model out/onnx --index idx.npz --query "..." --json

Both commands print memory and latency figures: index time and passages per second, index bytes
(and what fp32 would take), per-query latency p50/p95 (embedding + search, one query at a time
after a warm-up), search-only p50/p95, peak host RSS and, on CUDA, device memory in use.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk import DEFAULT_TASK, Embedder

BLOCK_ROWS = 65536  # rows dequantised at a time during search: 64K x 4096 x 4 B = 1 GiB worst case


# ---- corpus -----------------------------------------------------------------------------------------


def split_passages(text: str, chunk_chars: int) -> list[str]:
    """Paragraphs (blank-line separated), each wrapped at ``chunk_chars`` on whitespace."""
    out = []
    for para in text.replace("\r\n", "\n").split("\n\n"):
        words = para.split()
        line: list[str] = []
        size = 0
        for w in words:
            if line and size + len(w) + 1 > chunk_chars:
                out.append(" ".join(line))
                line, size = [], 0
            line.append(w)
            size += len(w) + 1
        if line:
            out.append(" ".join(line))
    return out


def read_corpus(docs: Path, patterns: Sequence[str], chunk_chars: int) -> tuple[list[str], list[str], list[int]]:
    """(passages, relative file path of each, passage index within its file)."""
    files = sorted({f for pat in patterns for f in docs.rglob(pat) if f.is_file()})
    texts, paths, index = [], [], []
    for f in files:
        for i, p in enumerate(split_passages(f.read_text(encoding="utf-8", errors="replace"), chunk_chars)):
            texts.append(p)
            paths.append(str(f.relative_to(docs)))
            index.append(i)
    return texts, paths, index


# ---- storage ----------------------------------------------------------------------------------------


def quantize(vectors: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stored (N, D), scale (N,), norm of the stored vector (N,)) for fp16 or int8 storage."""
    v = np.asarray(vectors, dtype=np.float32)
    if dtype == "fp16":
        stored = v.astype(np.float16)
        scales = np.ones(len(v), dtype=np.float32)
    elif dtype == "int8":
        scales = np.maximum(np.abs(v).max(axis=1), 1e-12).astype(np.float32) / 127.0  # symmetric, per vector
        stored = np.clip(np.rint(v / scales[:, None]), -127, 127).astype(np.int8)
    else:
        raise ValueError(f"dtype | got {dtype!r}. Note: fp16 or int8")
    norms = np.linalg.norm(stored.astype(np.float32), axis=1) * scales
    return stored, scales, np.maximum(norms, 1e-12).astype(np.float32)


def search(stored: np.ndarray, scales: np.ndarray, norms: np.ndarray, queries: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine: returns (indices (Q, k), scores (Q, k)), best first."""
    q = np.asarray(queries, dtype=np.float32)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    scores = np.empty((len(q), len(stored)), dtype=np.float32)
    for lo in range(0, len(stored), BLOCK_ROWS):
        block = stored[lo : lo + BLOCK_ROWS].astype(np.float32)  # (rows, D)
        scores[:, lo : lo + len(block)] = (q @ block.T) * (scales[lo : lo + len(block)] / norms[lo : lo + len(block)])
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    idx = np.take_along_axis(top, order, axis=1)
    return idx, np.take_along_axis(scores, idx, axis=1)


# ---- figures ----------------------------------------------------------------------------------------


def memory_figures(embedder: Embedder) -> dict[str, Any]:
    out: dict[str, Any] = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if embedder.device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info()
        out["cuda_in_use_mb"] = round((total - free) / 2**20, 1)  # device-wide; unified DRAM on Jetson
        out["cuda_total_mb"] = round(total / 2**20, 1)
    return out


def percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50_ms": 0.0, "p95_ms": 0.0}
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


# ---- commands ---------------------------------------------------------------------------------------


def cmd_index(args: argparse.Namespace) -> dict[str, Any]:
    texts, paths, index = read_corpus(Path(args.docs), args.glob, args.chunk_chars)
    if not texts:
        raise SystemExit(f"error: --docs | got no passages in {args.docs} for {args.glob}. Note: a folder of text files")
    t0 = time.perf_counter()
    embedder = Embedder.load(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vectors = embedder.embed_documents(texts, batch_size=args.batch_size, max_length=args.max_length)
    index_s = time.perf_counter() - t0
    stored, scales, norms = quantize(vectors, args.dtype)
    meta = {"model": str(args.model), "backend": embedder.backend, "precision": embedder.precision,
            "dim": embedder.dim, "dtype": args.dtype, "docs": str(args.docs), "passages": len(texts)}
    out = Path(args.index)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:  # a file handle keeps the name exactly as given (no added .npz)
        np.savez(fh, vectors=stored, scales=scales, norms=norms, texts=np.array(texts), paths=np.array(paths),
                 passage=np.array(index, dtype=np.int32), meta=np.array(json.dumps(meta)))
    vec_bytes = stored.nbytes + scales.nbytes + norms.nbytes
    stats = {
        "files": len(set(paths)), "passages": len(texts), "backend": f"{embedder.backend} {embedder.precision} on {embedder.device}",
        "load_s": round(load_s, 3), "index_s": round(index_s, 3),
        "passages_per_s": round(len(texts) / max(index_s, 1e-9), 1),
        "vector_bytes": int(vec_bytes), "fp32_bytes": int(len(texts) * embedder.dim * 4),
        "index_file_bytes": out.stat().st_size, **memory_figures(embedder),
    }
    embedder.close()
    return {"index": str(out), "stats": stats}


def cmd_search(args: argparse.Namespace) -> dict[str, Any]:
    with np.load(args.index, allow_pickle=False) as z:
        stored, scales, norms = z["vectors"], z["scales"], z["norms"]
        texts, paths, passage = z["texts"], z["paths"], z["passage"]
        meta = json.loads(str(z["meta"]))
    queries = list(args.query)
    if args.queries_file:
        queries += [q for q in Path(args.queries_file).read_text(encoding="utf-8").splitlines() if q.strip()]
    if not queries:
        raise SystemExit("error: --query | got none. Note: pass --query TEXT (repeatable) or --queries-file FILE")
    embedder = Embedder.load(args.model, device=args.device)
    if embedder.dim != stored.shape[1]:
        raise SystemExit(f"error: --model | got dim {embedder.dim}, the index has {stored.shape[1]}. "
                         f"Note: search with the model that built the index ({meta['model']})")

    def embed(q: list[str]) -> np.ndarray:
        if args.no_instruction:  # symmetric search: queries embedded like passages
            return embedder.embed_documents(q, max_length=args.max_length)
        return embedder.embed_queries(q, task=args.task, max_length=args.max_length)

    embed(queries[:1])  # warm-up: first CUDA kernels, allocator, tokenizer caches
    total_ms, search_ms, results = [], [], []
    for q in queries:
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            qv = embed([q])
            t1 = time.perf_counter()
            idx, scores = search(stored, scales, norms, qv, args.k)
            t2 = time.perf_counter()
            total_ms.append((t2 - t0) * 1e3)
            search_ms.append((t2 - t1) * 1e3)
        hits = [{"rank": r + 1, "score": round(float(s), 6), "path": str(paths[i]), "passage": int(passage[i]),
                 "text": str(texts[i])} for r, (i, s) in enumerate(zip(idx[0], scores[0], strict=True))]
        results.append({"query": q, "hits": hits})
    stats = {"queries": len(queries), "passages": len(stored), "index_dtype": meta.get("dtype"),
             "backend": f"{embedder.backend} {embedder.precision} on {embedder.device}",
             "index_bytes": int(stored.nbytes + scales.nbytes + norms.nbytes),
             "query": percentiles(total_ms), "search_only": percentiles(search_ms), **memory_figures(embedder)}
    embedder.close()
    return {"results": results, "stats": stats}


def _print_index(res: dict[str, Any]) -> None:
    s = res["stats"]
    print(f"indexed {s['passages']} passages from {s['files']} files with {s['backend']} -> {res['index']}")
    print(f"  model load {s['load_s']:.2f} s, embedding {s['index_s']:.2f} s ({s['passages_per_s']:.1f} passages/s)")
    print(f"  index: {s['vector_bytes'] / 1e6:.3f} MB of vectors (fp32 would be {s['fp32_bytes'] / 1e6:.3f} MB), "
          f"file {s['index_file_bytes'] / 1e6:.3f} MB")
    _print_memory(s)


def _print_search(res: dict[str, Any]) -> None:
    for r in res["results"]:
        print(f"query: {r['query']!r}")
        for h in r["hits"]:
            snippet = h["text"] if len(h["text"]) <= 90 else h["text"][:87] + "..."
            print(f"  {h['rank']:>2}. {h['score']:.4f}  {h['path']}#{h['passage']}  {snippet}")
    s = res["stats"]
    print(f"{s['queries']} queries over {s['passages']} passages ({s['index_dtype']}, {s['index_bytes'] / 1e6:.3f} MB) "
          f"with {s['backend']}")
    print(f"  per query (embed + search): p50 {s['query']['p50_ms']:.2f} ms, p95 {s['query']['p95_ms']:.2f} ms; "
          f"search only: p50 {s['search_only']['p50_ms']:.3f} ms, p95 {s['search_only']['p95_ms']:.3f} ms")
    _print_memory(s)


def _print_memory(s: dict[str, Any]) -> None:
    line = f"  memory: peak RSS {s['peak_rss_mb']:.1f} MB"
    if "cuda_in_use_mb" in s:
        line += f", CUDA in use {s['cuda_in_use_mb']:.1f} / {s['cuda_total_mb']:.1f} MB (device-wide)"
    print(line)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jetson_retrieval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="engine.plan, engine/ONNX bundle dir, or checkpoint dir")
    common.add_argument("--index", required=True, help="the .npz index file")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the artifact's best)")
    common.add_argument("--max-length", type=int, default=None, help="truncation in tokens (default: the artifact's)")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    pi = sub.add_parser("index", parents=[common], help="embed a folder of text files into an index")
    pi.add_argument("--docs", required=True, help="folder of text files (searched recursively)")
    pi.add_argument("--glob", action="append", default=None, help="file pattern (repeatable; default *.txt, *.md)")
    pi.add_argument("--dtype", choices=["fp16", "int8"], default="fp16", help="stored vector type (default fp16)")
    pi.add_argument("--chunk-chars", type=int, default=1000, help="wrap paragraphs longer than this (default 1000)")
    pi.add_argument("--batch-size", type=int, default=16, help="passages per forward pass (default 16)")

    ps = sub.add_parser("search", parents=[common], help="top-k passages for queries")
    ps.add_argument("--query", action="append", default=[], help="query text (repeatable)")
    ps.add_argument("--queries-file", default=None, help="one query per line")
    ps.add_argument("-k", type=int, default=5, help="hits per query (default 5)")
    ps.add_argument("--task", default=DEFAULT_TASK, help="instruction task for queries (NV-Embed query prefix)")
    ps.add_argument("--no-instruction", action="store_true", help="embed queries like passages (symmetric search)")
    ps.add_argument("--repeat", type=int, default=1, help="time each query this many times (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "index":
        args.glob = args.glob or ["*.txt", "*.md"]
        res = cmd_index(args)
        printer = _print_index
    else:
        res = cmd_search(args)
        printer = _print_search
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        printer(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
