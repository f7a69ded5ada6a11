"""Build two held-out-style retrieval sets (BEIR layout) from reserved sources, for EVALUATION ONLY.

The sources (the four FAQ documents, man pages, perldoc, FOLDOC) are reserved for evaluation:
never train on these sets, never commit them. They stand in for the two held-out sets of
issue 17, which are built from the same kinds of documents and are not in the repository:

* ``docqa``: the FAQ questions of ``build_faq_eval.py`` (each answered by its FAQ passage) in a
  corpus padded with thousands of distractor passages cut from man pages (sections 1-8 of
  ``manpages``/``manpages-dev``), perldoc (``perl-doc`` pods, the perlfaq pods excluded: their
  answers are already the relevant passages) and the Python documentation's reST sources (its
  ``faq/`` excluded). The held-out set has 593 questions and 5,593 passages; this one has the
  FAQ set's 621 questions and ``--distractors`` (default 5,000) more passages.
* ``foldoc``: computing term -> its FOLDOC definition. ``--queries`` terms (default 1,500) are
  drawn from entries whose definition has at least 8 words; the corpus holds their definitions
  plus other entries' definitions up to ``--corpus`` (default 9,917, the held-out size). The
  headword line is removed from each definition (the term itself stays wherever the definition
  text uses it, as in the dictionary). Query instruction: "Given a computing term, retrieve its
  dictionary definition".

    mkdir -p /tmp/heldout/deb && cd /tmp/heldout/deb && apt-get download python3.11-doc perl-doc \\
        debian-faq git-doc dict-foldoc manpages manpages-dev
    for d in *.deb; do n=${d%%_*}; mkdir -p ../x/$n; dpkg-deb -x "$d" ../x/$n; done; cd -
    python scripts/build_heldout_eval.py docqa /tmp/heldout runs/heldout-docqa
    python scripts/build_heldout_eval.py foldoc /tmp/heldout runs/heldout-foldoc
    nvembed eval models/nvembed-debian-small --beir runs/heldout-docqa
    nvembed eval bm25 --beir runs/heldout-foldoc

EXTRACT_ROOT holds x/<package> (dpkg-deb -x output) for the packages above. Every choice is
seeded, so the sets are the same on every machine with the same package versions.
"""
import argparse
import glob
import gzip
import importlib.util
import json
import os
import random
import re
import subprocess
from pathlib import Path

WS = re.compile(r"\s+")
PASSAGE_WORDS = (60, 220)  # distractor passages: paragraphs joined up to 60-220 words (FAQ answers: mean ~120)
MAXC = 1500  # same cut as the FAQ answers


def norm(s: str) -> str:
    return WS.sub(" ", s).strip()


def _faq_module():
    spec = importlib.util.spec_from_file_location("build_faq_eval", Path(__file__).with_name("build_faq_eval.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_beir(outd: str, corpus: list[dict], queries: list[dict], qrels: list[tuple[str, str]], instruction: str) -> None:
    os.makedirs(outd, exist_ok=True)
    for name, rows in (("corpus", corpus), ("queries", queries)):
        with open(f"{outd}/{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(f"{outd}/qrels.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, d in qrels:
            f.write(f"{q}\t{d}\t1\n")
    Path(f"{outd}/instruction.txt").write_text(instruction + "\n")


def chunk_paragraphs(paras: list[str], rng: random.Random) -> list[str]:
    """Consecutive paragraphs joined into passages of a drawn target length (words)."""
    out, cur, target = [], [], rng.randint(*PASSAGE_WORDS)
    for p in paras:
        cur.append(p)
        if sum(len(x.split()) for x in cur) >= target:
            out.append(norm(" ".join(cur))[:MAXC])
            cur, target = [], rng.randint(*PASSAGE_WORDS)
    if cur and sum(len(x.split()) for x in cur) >= PASSAGE_WORDS[0]:
        out.append(norm(" ".join(cur))[:MAXC])
    return out


def man_paragraphs(path: str) -> list[str]:
    env = dict(os.environ, MANWIDTH="200", LANG="C.UTF-8")
    try:
        txt = subprocess.run(["man", "-l", path], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=20).stdout
    except subprocess.TimeoutExpired:
        return []
    txt = re.sub(r".\x08", "", txt)  # overstrike bold/underline
    lines = txt.splitlines()[1:-1]  # page header and footer
    return [norm(b) for b in re.split(r"\n\s*\n", "\n".join(lines)) if len(b.split()) >= 8]


def pod_paragraphs(path: str) -> list[str]:
    try:
        txt = subprocess.run(["pod2text", path], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=30).stdout
    except subprocess.TimeoutExpired:
        return []
    return [norm(b) for b in re.split(r"\n\s*\n", txt) if len(b.split()) >= 8]


def rst_paragraphs(path: str) -> list[str]:
    txt = Path(path).read_text(encoding="utf-8", errors="replace")
    out = []
    for b in re.split(r"\n\s*\n", txt):
        if b.lstrip().startswith(".. ") or re.fullmatch(r"[\s=\-~^*#+`]+", b):
            continue
        b = re.sub(r":\w+(?::\w+)?:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", b)
        b = b.replace("``", "")
        if len(b.split()) >= 8:
            out.append(norm(b))
    return out


def distractor_files(root: str) -> list[tuple[str, str]]:
    x = f"{root}/x"
    man = sorted(glob.glob(f"{x}/manpages*/usr/share/man/man[1-8]/*.gz"))
    pods = [p for p in sorted(glob.glob(f"{x}/perl-doc/usr/share/perl/*/pod/*.pod")) if "perlfaq" not in p]
    rst = [p for p in sorted(glob.glob(f"{x}/python3.11-doc/usr/share/doc/python3.11/html/_sources/**/*.rst.txt",
                                        recursive=True)) if "/faq/" not in p]
    return [("man", p) for p in man] + [("pod", p) for p in pods] + [("rst", p) for p in rst]


def build_docqa(root: str, outd: str, n_distractors: int, seed: int) -> dict:
    faq = _faq_module()
    corpus, queries, qrels, seen = [], [], [], set()
    for prefix, fn in (("python-faq", faq.python_faq), ("perlfaq", faq.perl_faq),
                       ("debfaq", faq.debian_faq), ("gitfaq", faq.git_faq)):
        k = 0
        for q, a in fn(root):
            if len(a) < faq.MINC or not faq.is_question(q):
                continue
            a = faq.trunc(a)
            if q.lower() in seen or a in seen:
                continue
            seen.update((q.lower(), a))
            k += 1
            i = f"{prefix}-{k:04d}"
            corpus.append({"_id": i, "title": "", "text": a})
            queries.append({"_id": i, "text": q})
            qrels.append((i, i))
    rng = random.Random(seed)
    files = distractor_files(root)
    rng.shuffle(files)
    readers = {"man": man_paragraphs, "pod": pod_paragraphs, "rst": rst_paragraphs}
    kinds: dict[str, int] = {}
    per_file = 6  # at most this many passages from one file, so one big page cannot fill the corpus
    for kind, path in files:
        if len(corpus) - len(queries) >= n_distractors:
            break
        passages = chunk_paragraphs(readers[kind](path), rng)
        rng.shuffle(passages)
        for p in passages[:per_file]:
            if p in seen or len(corpus) - len(queries) >= n_distractors:
                continue
            seen.add(p)
            kinds[kind] = kinds.get(kind, 0) + 1
            corpus.append({"_id": f"{kind}-{len(corpus):05d}", "title": "", "text": p})
    write_beir(outd, corpus, queries, qrels,
               "Given a question, retrieve documentation passages that answer the question")
    return {"queries": len(queries), "corpus": len(corpus), "distractors_by_source": kinds}


def foldoc_entries(root: str) -> list[tuple[str, str]]:
    """(term, definition) from the dictd files; the headword line is dropped."""
    d = f"{root}/x/dict-foldoc/usr/share/dictd"
    data = gzip.decompress(Path(f"{d}/foldoc.dict.dz").read_bytes())  # dictzip is gzip-compatible
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def num(s: str) -> int:
        v = 0
        for ch in s:
            v = v * 64 + b64.index(ch)
        return v

    out = []
    for line in Path(f"{d}/foldoc.index").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00database"):
            continue
        term, off, size = parts[0], num(parts[1]), num(parts[2])
        body = data[off:off + size].decode("utf-8", errors="replace")
        # An entry is its headword line(s) (original case, synonyms on further lines), a blank
        # line, then the indented definition.
        header, _, body = body.strip("\n").partition("\n\n")
        term = header.splitlines()[0].strip() if header.strip() else term
        body = re.sub(r"\{([^}]*)\}", r"\1", body)  # cross-reference braces
        body = re.sub(r"\(\d{4}-\d{2}-\d{2}\)\s*$", "", body.strip())  # trailing edit date
        out.append((term, norm(body)[:MAXC]))
    return out


def build_foldoc(root: str, outd: str, n_queries: int, n_corpus: int, seed: int) -> dict:
    entries, seen, uniq = foldoc_entries(root), set(), []
    for term, definition in entries:
        # Entries that only point elsewhere ("<see> X") or repeat another's text are not definitions.
        if len(definition.split()) < 8 or definition in seen or definition.lower().startswith("see "):
            continue
        seen.add(definition)
        uniq.append((term, definition))
    rng = random.Random(seed)
    order = list(range(len(uniq)))
    rng.shuffle(order)
    chosen = sorted(order[:n_corpus])
    qset = set(rng.sample(chosen, min(n_queries, len(chosen))))
    corpus, queries, qrels = [], [], []
    for i in chosen:
        term, definition = uniq[i]
        did = f"fd{i:05d}"
        corpus.append({"_id": did, "title": "", "text": definition})
        if i in qset:
            queries.append({"_id": f"fq{i:05d}", "text": term})
            qrels.append((f"fq{i:05d}", did))
    write_beir(outd, corpus, queries, qrels, "Given a computing term, retrieve its dictionary definition")
    return {"entries": len(entries), "usable": len(uniq), "queries": len(queries), "corpus": len(corpus)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python scripts/build_heldout_eval.py docqa /tmp/heldout runs/heldout-docqa",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="set", required=True)
    a = sub.add_parser("docqa", help="FAQ questions among man-page, perldoc and Python-doc passages")
    a.add_argument("root"), a.add_argument("output")
    a.add_argument("--distractors", type=int, default=5000)
    a.add_argument("--seed", type=int, default=17)
    b = sub.add_parser("foldoc", help="computing term -> FOLDOC definition")
    b.add_argument("root"), b.add_argument("output")
    b.add_argument("--queries", type=int, default=1500)
    b.add_argument("--corpus", type=int, default=9917)
    b.add_argument("--seed", type=int, default=17)
    args = ap.parse_args()
    if args.set == "docqa":
        stats = build_docqa(args.root, args.output, args.distractors, args.seed)
    else:
        stats = build_foldoc(args.root, args.output, args.queries, args.corpus, args.seed)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
