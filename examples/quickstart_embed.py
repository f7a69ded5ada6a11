"""Quickstart: embed queries and documents with the shipped model and rank the documents.

    python examples/quickstart_embed.py                        # the shipped default model
    python examples/quickstart_embed.py --model out/onnx-int8   # any artifact: checkpoint, bundle, .onnx, .plan

Prints each query's top documents with cosine scores (x100, as NV-Embed-v2's README does).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nvembed_sdk import Embedder

ROOT = Path(__file__).resolve().parents[1]
TASK = "Given a one-line summary of a software package, retrieve its full description"

DOCUMENTS = [
    "GNU Wget is a free software package for retrieving files using HTTP, HTTPS and FTP, the most widely "
    "used Internet protocols. It is a non-interactive commandline tool, so it may easily be called from "
    "scripts, cron jobs, terminals without X-Windows support, etc.",
    "FLAC stands for Free Lossless Audio Codec. Grossly oversimplified, FLAC is similar to MP3, but lossless, "
    "meaning that audio is compressed in FLAC without any loss in quality.",
    "This package contains the Python bindings for the GTK graphical user interface toolkit, letting Python "
    "programs create windows, buttons and dialogs.",
    "PostgreSQL is a fully featured object-relational database management system. It supports a large part "
    "of the SQL standard and is designed to be extensible by users in many aspects.",
    "A lightweight library for parsing command-line options in C programs, with support for long options "
    "and automatic help output.",
]
QUERIES = ["retrieves files from the web", "lossless audio codec", "object-relational SQL database server"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "nvembed-debian-small"), help="any nvembed artifact")
    ap.add_argument("-k", type=int, default=2, help="hits per query")
    args = ap.parse_args()
    emb = Embedder.load(args.model)
    print(f"{emb!r}")
    q = emb.embed_queries(QUERIES, task=TASK)  # "Instruct: {task}\nQuery: " prefix, masked from pooling
    d = emb.embed_documents(DOCUMENTS)  # no instruction
    scores = (q @ d.T) * 100
    for i, query in enumerate(QUERIES):
        print(f"\nquery: {query}")
        for j in scores[i].argsort()[::-1][: args.k]:
            print(f"  {scores[i, j]:6.2f}  {DOCUMENTS[j][:90]}...")


if __name__ == "__main__":
    main()
