"""A term -> description retrieval set cut from the development corpus, for CHOOSING checkpoints.

Usage:
    python scripts/build_dev_terms.py --dev-dir ../shared/data/dev/debpkg --output runs/dev-terms

Why: issue 17 judges the shipped model on a held-out term -> definition set (not in the
repository), where BM25 leads because a definition often names its term verbatim. Checkpoints
may be chosen only on development data, and ``dev/debpkg`` holds summary -> description pairs,
so this script cuts a term-style set out of the same development corpus: each query is a
distinctive technical term (the extractor of ``build_term_pairs.py``: inner capitals, digits,
``/ . + # -`` inside, or a run of 2-4 capitalised words) found in at most ``--max-df`` of the
corpus's descriptions, and every description that contains it is relevant. The corpus is the
whole development corpus (5,879 descriptions), the instruction that of the held-out set. Nothing
here is trained on (``dev/`` is refused by the training commands); the reserved sources are not
read.

Output: a BEIR-layout folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels.tsv``,
``instruction.txt``), deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
from collections import defaultdict
from pathlib import Path

from nvembed_sdk.train.readers import read_jsonl


def _sibling(name: str):
    """Another script of this folder as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TERMS = _sibling("build_term_pairs")  # the extractor and instruction of the training term pairs


def build(dev_dir: Path, n_queries: int, max_df: int, seed: int) -> tuple[list[dict], list[dict], list[tuple[str, str]]]:
    corpus = [{"_id": r["_id"], "text": r["text"]} for r in read_jsonl(dev_dir / "corpus.jsonl.gz")]
    docs_of: dict[str, set[str]] = defaultdict(set)
    for d in corpus:
        for t in TERMS.tech_terms(d["text"]):
            docs_of[t].add(d["_id"])
    # One candidate term per description so no description dominates; sorted before the draw.
    by_doc: dict[str, list[str]] = defaultdict(list)
    for t, ds in docs_of.items():
        if len(ds) <= max_df:
            for d in ds:
                by_doc[d].append(t)
    rng = random.Random(seed)
    picked = []
    for d in sorted(by_doc):
        picked.append(rng.choice(sorted(by_doc[d])))
    picked = sorted(set(picked))
    picked = rng.sample(picked, min(n_queries, len(picked)))
    queries = [{"_id": f"t{i:04d}", "text": t} for i, t in enumerate(picked)]
    qrels = [(q["_id"], d) for q in queries for d in sorted(docs_of[q["text"]])]
    return corpus, queries, qrels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python scripts/build_dev_terms.py --dev-dir ../shared/data/dev/debpkg "
                                        "--output runs/dev-terms")
    ap.add_argument("--dev-dir", type=Path, required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--queries", type=int, default=1500)
    ap.add_argument("--max-df", type=int, default=3, help="a query term occurs in at most this many descriptions")
    ap.add_argument("--seed", type=int, default=17)
    a = ap.parse_args()
    corpus, queries, qrels = build(a.dev_dir, a.queries, a.max_df, a.seed)
    # Written beside the target, then renamed into place: an interrupted build leaves no half set.
    tmp = a.output.with_name(a.output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _sibling("build_heldout_eval").write_beir(str(tmp), corpus, queries, qrels, TERMS.TERM_TASK)
    shutil.rmtree(a.output, ignore_errors=True)
    tmp.replace(a.output)
    print(json.dumps({"output": str(a.output), "queries": len(queries), "corpus": len(corpus), "qrels": len(qrels)}, indent=1))


if __name__ == "__main__":
    main()
