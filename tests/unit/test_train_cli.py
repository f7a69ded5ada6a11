"""`nvembed train | mine | eval | tokenizer train` through click, and the BEIR metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from nvembed_sdk.cli import main
from nvembed_sdk.train.data import write_jsonl
from nvembed_sdk.train.evaluate import BeirSet, load_beir, retrieval_metrics


@pytest.fixture()
def beir_dir(tmp_path):
    d = tmp_path / "beir"
    write_jsonl(d / "corpus.jsonl.gz", [{"_id": f"d{i}", "text": t} for i, t in enumerate(
        ["ogg vorbis audio codec", "terminal text editor", "python gtk bindings", "chess game engine"])])
    write_jsonl(d / "queries.jsonl", [{"_id": "q0", "text": "audio codec"}, {"_id": "q1", "text": "chess engine"}])
    (d / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td3\t1\n")
    (d / "instruction.txt").write_text("Find the package\n")
    return d


def test_metrics_on_a_hand_computed_ranking():
    beir = BeirSet(["a", "b", "c"], ["", "", ""], ["q0", "q1"], ["", ""], {"q0": {"b": 1}, "q1": {"a": 1, "c": 1}}, "")
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])  # both rank a, b, c
    m = retrieval_metrics(scores, beir)
    ndcg_q0 = 1 / np.log2(3)
    ndcg_q1 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    assert m["ndcg@10"] == pytest.approx((ndcg_q0 + ndcg_q1) / 2)
    assert m["mrr@10"] == pytest.approx((0.5 + 1.0) / 2) and m["recall@100"] == 1.0


def test_eval_bm25_and_checkpoint(beir_dir, tiny_checkpoint):
    beir = load_beir(beir_dir)
    assert beir.instruction == "Find the package" and len(beir.docs) == 4
    res = CliRunner().invoke(main, ["eval", "bm25", "--beir", str(beir_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ndcg@10"] == pytest.approx(1.0)
    res = CliRunner().invoke(main, ["eval", str(tiny_checkpoint), "--beir", str(beir_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert 0.0 <= json.loads(res.output)["ndcg@10"] <= 1.0


def test_tokenizer_train_command(tmp_path):
    src = tmp_path / "t.jsonl"
    write_jsonl(src, [{"query": f"query number {i}", "positive": f"a positive text about item {i} and tools"}
                      for i in range(300)])
    res = CliRunner().invoke(main, ["tokenizer", "train", str(src), "-o", str(tmp_path / "tok"), "--vocab-size", "400"])
    assert res.exit_code == 0, res.output
    from nvembed_sdk.text import TextPipeline

    pipe = TextPipeline(tmp_path / "tok")
    assert pipe.vocab_size == 400 and pipe.tokenizer.token_to_id("<0x41>") == 3 + 0x41


def test_help_texts_explain():
    runner = CliRunner()
    for args, needle in ((["train", "--help"], "--resume"), (["mine", "--help"], "TopK-PercPos"),
                         (["eval", "--help"], "nDCG@10"), (["tokenizer", "train", "--help"], "byte-fallback")):
        res = runner.invoke(main, args)
        assert res.exit_code == 0 and needle in res.output, (args, res.output)


def test_train_errors_are_one_line(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "tokenizer": "t", "data": ["x.jsonl"], "lr_max": 1}))
    res = CliRunner().invoke(main, ["train", str(cfg)])
    assert res.exit_code == 1 and res.output.startswith("error: ") and res.output.count("\n") == 1
    assert "unknown keys ['lr_max']" in res.output
