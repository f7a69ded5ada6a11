"""Term -> definition training pairs, cut from the training files only (stage 1e of the shipped model).

Usage:
    python scripts/build_term_pairs.py --train-dir ../shared/data/train --output runs/v6/pairs.jsonl.gz

Why: the shipped model of version 5 retrieved documentation passages about as well as BM25 but
fell far below it when the query is a bare term ("/dev/null", ".NET framework", "ampersand") and
the document its definition. Term -> definition is a task it had never been trained on: its
stage files held summaries, questions and WordNet lemmas *with* their part of speech. In a
definition the term often appears verbatim (in about 44 % of a dictionary's entries), which is
what BM25 exploits; a small dense model has to be taught to carry a rare term's identity into its
vector. Five kinds of pair, written in the generic record layout (``query``, ``positive``,
``instruction``, ``group``), all from ``train/`` (nothing from ``dev/``, ``calibration/`` or the
sources reserved for evaluation):

* ``name``: a Debian package name -> its long description (one package per source: the one named
  like the source, else the shortest name), instruction ``TERM_TASK``;
* ``term``: a technical term cut from a description -> that description: a word with inner
  capitals, digits or ``/ . + # -`` inside ("PostgreSQL", "IPv6", "TCP/IP", "C++"), or a run of
  2-4 capitalised words ("GNU Image Manipulation Program"), that occurs in at most
  ``--max-df`` descriptions, instruction ``TERM_TASK``;
* ``word``: a rare lower-case word cut from a description ("multiplexer", "daemonize"), found
  in at most ``--max-df`` descriptions -> that description, instruction ``TERM_TASK``. Most of a
  computing dictionary's terms are plain words, not product names; cap 0 by default, so the
  stage-1e file is unchanged (stage 1f sets it);
* ``lemma``: a WordNet lemma without its part of speech -> its gloss, instruction
  ``WORD_TASK``;
* ``summary``: the summary -> description pairs of earlier stages (their own instruction), so
  the in-domain task is kept;
* ``question``: the same pairs under the SDK's default question instruction.

Every kind is capped (``--per-kind``) with a seeded draw, so the teacher cache a stage fills
holds exactly the texts it trains on. Output: gzipped JSONL, shuffled with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from nvembed_sdk.train.readers import read_jsonl, write_jsonl

TERM_TASK = "Given a computing term, retrieve its dictionary definition"
WORD_TASK = "Given a word, retrieve its dictionary definition"
QUESTION_TASK = "Given a question, retrieve passages that answer the question"

_STRIP = "\"'`,;:!?()[]{}<>*"
# A technical-looking word: inner capital (PostgreSQL, libXft), a digit beside letters (IPv6,
# MP3), or an inner / . + # - (TCP/IP, C++, Node.js, x86-64).
_TECH = re.compile(r"^(?=.*[A-Za-z])(?:[A-Za-z0-9]*[a-z][A-Z][A-Za-z0-9]*|[A-Z]{2,}[0-9A-Za-z]*|"
                   r"[A-Za-z]+[0-9][A-Za-z0-9]*|[0-9]+[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+(?:[/.+#-][A-Za-z0-9+#]*)+)$")
_CAP_RUN = re.compile(r"\b(?:[A-Z][a-z]+(?:\s+|$)){2,4}")
_URLISH = re.compile(r"https?:|www\.|@|\.(?:com|org|net|html?)$|^[0-9.]+$")
_POS = re.compile(r"\s+\((?:noun|verb|adjective|adverb|adjective satellite)\)$")


def tech_terms(text: str) -> set[str]:
    """The technical words and capitalised name runs of one description."""
    out = set()
    for raw in text.split():
        w = raw.strip(_STRIP).rstrip(".")
        if 2 <= len(w) <= 40 and _TECH.match(w) and not _URLISH.search(w):
            out.add(w)
    for m in _CAP_RUN.finditer(text.replace("\n", " ")):
        run = m.group(0).strip()
        if run.split()[0] not in ("The", "This", "It", "A", "An", "In", "For"):
            out.add(run)
    return out


_WORD = re.compile(r"^[a-z][a-z-]{3,28}[a-z]$")


def rare_words(text: str) -> set[str]:
    """Lower-case words of one description (filtered by document frequency by the caller)."""
    out = set()
    for raw in text.split():
        w = raw.strip(_STRIP).rstrip(".")
        if _WORD.match(w) and "--" not in w:
            out.add(w)
    return out


def one_per_source(packages: list[dict]) -> list[dict]:
    by_src: dict[str, list[dict]] = defaultdict(list)
    for r in packages:
        by_src[r["source"]].append(r)
    out = []
    for src, rs in sorted(by_src.items()):
        named = [r for r in rs if r["id"][3:] == src]
        out.append(named[0] if named else min(rs, key=lambda r: (len(r["id"]), r["id"])))
    return out


def cut_terms(firsts: list[dict], extract, max_df: int, pick) -> list[tuple[str, dict]]:
    """(term, record) pairs: ``pick`` draws from each description's terms that occur in at most
    ``max_df`` of the descriptions (one per source: siblings would count a term twice) and are not
    the source's own name."""
    terms_of = {r["source"]: extract(r["positive"]) for r in firsts}
    df = Counter(t for ts in terms_of.values() for t in ts)
    out = []
    for r in firsts:
        cands = sorted(t for t in terms_of[r["source"]] if df[t] <= max_df and t.lower() != r["source"].lower())
        if cands:
            out += [(t, r) for t in pick(cands)]
    return out


def build(train_dir: Path, caps: dict[str, int], max_df: int, seed: int,
          terms_per_source: int = 1) -> tuple[list[dict], dict[str, int]]:
    rng = random.Random(seed)
    packages = list(read_jsonl(train_dir / "debian-packages.jsonl.gz"))
    firsts = one_per_source(packages)

    def pair(q: str, p: str, task: str, group: str, kind: str) -> dict:
        return {"query": q, "positive": p, "instruction": task, "group": group, "kind": kind}

    kinds: dict[str, list[dict]] = {}
    kinds["name"] = [pair(r["id"][3:], r["positive"], TERM_TASK, "src:" + r["source"], "name") for r in firsts]

    # One term per source (stage 1e) draws with choice(); more (stage 1f) with sample(): the
    # one-term output stays byte-identical to the file stage 1e trained on.
    k = terms_per_source
    kinds["term"] = [pair(t, r["positive"], TERM_TASK, "src:" + r["source"], "term") for t, r in cut_terms(
        firsts, tech_terms, max_df, lambda c: [rng.choice(c)] if k == 1 else rng.sample(c, min(k, len(c))))]

    lemmas = [r for r in read_jsonl(train_dir / "wordnet.jsonl.gz") if r.get("type") == "lemma_to_gloss"]
    kinds["lemma"] = [pair(_POS.sub("", r["query"]), r["positive"], WORD_TASK, "syn:" + r["synset"], "lemma")
                      for r in lemmas]
    kinds["summary"] = [pair(r["query"], r["positive"], r.get("instruction") or "", "src:" + r["source"], "summary")
                        for r in packages]
    kinds["question"] = [dict(p, instruction=QUESTION_TASK, kind="question") for p in kinds["summary"]]
    # Own generator, drawn after the other kinds: with the word cap at 0 the file is stage 1e's.
    wrng = random.Random(seed + 1)
    kinds["word"] = [pair(w, r["positive"], TERM_TASK, "src:" + r["source"], "word") for w, r in cut_terms(
        firsts, rare_words, max_df, lambda c: wrng.sample(c, min(terms_per_source, len(c))))]

    out, counts = [], {}
    for kind, rows in kinds.items():
        picked = rng.sample(rows, min(caps.get(kind, len(rows)), len(rows)))
        counts[kind] = len(picked)
        out += picked
    rng.shuffle(out)
    return out, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python scripts/build_term_pairs.py --train-dir ../shared/data/train "
                                        "--output runs/v6/pairs.jsonl.gz")
    ap.add_argument("--train-dir", type=Path, required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--per-kind", type=int, default=12000, help="pairs drawn per kind (summary: twice this)")
    ap.add_argument("--max-df", type=int, default=30, help="a cut term occurs in at most this many descriptions")
    ap.add_argument("--terms-per-source", type=int, default=1, help="technical terms cut per description")
    ap.add_argument("--cap", action="append", default=[], metavar="KIND=N",
                    help="override one kind's cap, e.g. --cap term=30000 (repeatable)")
    ap.add_argument("--seed", type=int, default=6)
    a = ap.parse_args()
    caps = {"name": a.per_kind, "term": a.per_kind, "lemma": a.per_kind, "summary": 2 * a.per_kind,
            "question": a.per_kind // 2, "word": 0}
    for item in a.cap:
        kind, _, n = item.partition("=")
        if kind not in caps or not n.isdigit():
            ap.error(f"--cap {item!r}: expected KIND=N with KIND one of {', '.join(caps)}")
        caps[kind] = int(n)
    rows, counts = build(a.train_dir, caps, a.max_df, a.seed, a.terms_per_source)
    write_jsonl(a.output, rows)  # staged, gzip without name or time: reproducible bytes
    print(json.dumps({"output": str(a.output), "pairs": len(rows), "by_kind": counts}, indent=1))


if __name__ == "__main__":
    main()
