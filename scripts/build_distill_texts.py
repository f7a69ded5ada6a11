"""Extra texts for embedding distillation, cut from the training files (no labels needed).

Usage:
    python scripts/build_distill_texts.py --train-dir ../shared/data/train --output FILE.jsonl.gz [--max-texts N]

Why: the student matches its teacher's (projected) embeddings well on the texts it was trained
on and much less on other text, so its retrieval quality outside the training pairs stays far
below the teacher's. More, and more varied, distillation texts are the cheap remedy; they need
no positives or negatives. Three kinds, all from ``train/`` only:

* sentences and sentence pairs of Debian package descriptions (documentation-like prose);
* questions written from package summaries with fixed templates ("How can I get a {summary}?"),
  so the question form the SDK's default instruction expects is seen with teacher targets;
* WordNet example sentences and glosses of all 108,197 records (stage 1 used 40,000).

Output: gzipped JSONL, one ``{"text": ...}`` per line, deduplicated, shuffled with a fixed seed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

QUESTION_TEMPLATES = (
    "How can I get a {s}?",
    "Is there a {s}?",
    "Which package provides a {s}?",
    "What should I install for a {s}?",
    "I am looking for a {s}. What can I use?",
    "Where do I find a {s}?",
    "What is a good {s}?",
    "Which program is a {s}?",
)
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def sentences(text: str) -> list[str]:
    """Sentences of a description: paragraphs split at sentence ends, 4 to 60 words."""
    out = []
    for para in re.split(r"\n\s*\n|\n(?=\s*[*-] )", text):
        for s in _SENT.split(" ".join(para.split())):
            if 4 <= len(s.split()) <= 60:
                out.append(s)
    return out


def build(train_dir: Path, max_texts: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pkg_sents: list[str] = []
    questions: list[str] = []
    with gzip.open(train_dir / "debian-packages.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            sents = sentences(r["positive"])
            pkg_sents += sents
            pkg_sents += [f"{a} {b}" for a, b in zip(sents, sents[1:], strict=False)][:2]
            s = r["query"].strip().rstrip(".")
            if s:
                questions.append(rng.choice(QUESTION_TEMPLATES).format(s=s[0].lower() + s[1:]))
    wn: list[str] = []
    with gzip.open(train_dir / "wordnet.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            wn += [r["query"], r["positive"]]
    # equal shares of the three kinds, each deduplicated and shuffled
    kinds = [list(dict.fromkeys(k)) for k in (pkg_sents, questions, wn)]
    for k in kinds:
        rng.shuffle(k)
    share = max_texts // 3
    out = list(dict.fromkeys(t for k in kinds for t in k[:share]))
    rng.shuffle(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-dir", required=True, help="../shared/data/train")
    ap.add_argument("--output", required=True, help="output .jsonl.gz")
    ap.add_argument("--max-texts", type=int, default=45_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    texts = build(Path(args.train_dir), args.max_texts, args.seed)
    with gzip.open(args.output, "wt", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    print(f"{args.output}: {len(texts):,} texts")


if __name__ == "__main__":
    main()
