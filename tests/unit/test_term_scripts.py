"""The term-pair builder (stage 1e/1f training data) and the development term set, on small files."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from nvembed_sdk.train.readers import read_jsonl, write_jsonl

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
DESCRIPTIONS = {
    "gizmo": "Gizmo is a multiplexer for PostgreSQL sockets written in C++ with IPv6 support.",
    "whatsit": "Whatsit converts spreadsheets and daemonizes the converter; it speaks TCP/IP.",
    "doohickey": "Doohickey renders fonts with FreeType and caches the glyphs.",
    "thingamajig": "A small multiplexer for serial consoles, with a curses interface.",
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train_dir(tmp_path: Path) -> Path:
    d = tmp_path / "train"
    d.mkdir()
    write_jsonl(d / "debian-packages.jsonl.gz", [
        {"id": f"dp-{s}", "source": s, "query": f"summary of {s}", "positive": text,
         "instruction": "Given a one-line summary of a software package, retrieve its full description"}
        for s, text in DESCRIPTIONS.items()])
    write_jsonl(d / "wordnet.jsonl.gz", [
        {"type": "lemma_to_gloss", "query": "sprocket (noun)", "positive": "a toothed wheel", "synset": "s1"}])
    return d


def test_word_kind_is_off_by_default_and_cuts_rare_lower_case_words(tmp_path):
    terms = _load("build_term_pairs")
    train = _train_dir(tmp_path)
    caps = {"name": 100, "term": 100, "lemma": 100, "summary": 100, "question": 100, "word": 0}
    rows, counts = terms.build(train, caps, max_df=30, seed=6)
    assert counts["word"] == 0 and not [r for r in rows if r["kind"] == "word"]
    # The word kind draws from its own generator: turning it on leaves every other pair as it was.
    rows2, counts2 = terms.build(train, dict(caps, word=100), max_df=1, seed=6, terms_per_source=2)
    words = [r for r in rows2 if r["kind"] == "word"]
    assert words and all(r["query"] in r["positive"] and r["query"].islower() for r in words)
    assert "multiplexer" not in {r["query"] for r in words}  # in two descriptions: over --max-df 1
    assert {r["query"] for r in rows2 if r["kind"] == "lemma"} == {"sprocket"}  # part of speech removed


def test_dev_term_set_queries_name_their_relevant_descriptions(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    write_jsonl(dev / "corpus.jsonl.gz", [{"_id": f"d{i}", "text": t} for i, t in enumerate(DESCRIPTIONS.values())])
    out = tmp_path / "dev-terms"
    res = subprocess.run([sys.executable, str(SCRIPTS / "build_dev_terms.py"), "--dev-dir", str(dev),
                          "--output", str(out), "--max-df", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    corpus = {r["_id"]: r["text"] for r in read_jsonl(out / "corpus.jsonl")}
    queries = {r["_id"]: r["text"] for r in read_jsonl(out / "queries.jsonl")}
    qrels = [line.split("\t")[:2] for line in (out / "qrels.tsv").read_text().splitlines()[1:]]
    assert len(corpus) == 4 and len(queries) == 3 and qrels  # the last description has no technical term
    for q, d in qrels:
        assert queries[q] in corpus[d]
    assert (out / "instruction.txt").read_text().strip() == "Given a computing term, retrieve its dictionary definition"
    # Rebuilt over an existing folder: the same files, nothing left half-written.
    again = subprocess.run([sys.executable, str(SCRIPTS / "build_dev_terms.py"), "--dev-dir", str(dev),
                            "--output", str(out), "--max-df", "1"], capture_output=True, text=True)
    assert again.returncode == 0 and not list(tmp_path.glob("*.partial"))
