"""Training data rules: no clashes in a batch, example-based pairs, instructions, group ids, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nvembed_sdk.errors import InputError
from nvembed_sdk.text import TextPipeline
from nvembed_sdk.train.config import DataSource, TrainConfig
from nvembed_sdk.train.data import (
    Example,
    TrainData,
    build_section_pairs,
    collate,
    norm_text,
    pack_batches,
    write_jsonl,
)


def test_batches_never_hold_one_group_query_or_positive_twice():
    exs = [Example(f"q{i % 7}", f"p{i % 11}", group=f"g{i % 5}") for i in range(200)]
    batches = pack_batches(exs, 4)
    assert batches
    for b in batches:
        assert len(b) == 4
        for key in ("group", "query", "positive"):
            values = [norm_text(getattr(exs[i], key)) for i in b]
            assert len(set(values)) == len(values), (key, values)


def test_section_pairs_are_example_based():
    recs = [{"text": f"text {lab} {s} {i}", "label": lab, "source": f"src{s}"}
            for lab in ("games", "libs", "net") for s in range(3) for i in range(2)]
    pairs = build_section_pairs(recs, 60, "clustering", num_negatives=2, seed=0)
    label_of = {r["text"]: r["label"] for r in recs}
    source_of = {r["text"]: r["source"] for r in recs}
    for p in pairs:
        assert label_of[p.query] == label_of[p.positive] and source_of[p.query] != source_of[p.positive]
        assert all(label_of[n] != label_of[p.query] for n in p.negatives) and len(p.negatives) == 2
        assert p.group == "label:" + label_of[p.query] and p.task == "clustering"
        assert p.doc_prefix == p.query_prefix != ""  # symmetric task: instruction on both sides


def test_retrieval_instruction_on_queries_only():
    e = Example("q", "p", instruction="Find it")
    assert e.query_prefix == "Instruct: Find it\nQuery: " and e.doc_prefix == ""


def test_collate_pools_without_the_instruction_and_maps_groups(tiny_tokenizer_dir, tmp_path):
    f = tmp_path / "d.jsonl"
    write_jsonl(f, [{"query": "alpha", "positive": "PA", "negatives": ["PB"], "group": "A", "instruction": "Find"},
                    {"query": "beta", "positive": "PB", "negatives": ["zzz"], "group": "B", "instruction": "Find"}])
    data = TrainData([DataSource(str(f))], num_negatives=1, seed=0)
    text = TextPipeline(tiny_tokenizer_dir)
    exs = data.epoch_examples(0)
    exs = sorted(exs, key=lambda e: e.query)
    b = collate(exs, data, text, np.random.default_rng(0), 32, 32)
    L = text.instruction_length("Instruct: Find\nQuery: ")
    assert L > 0 and int(b.queries.pool_mask[:, :L].sum()) == 0
    assert b.docs.pool_mask[:, 0].all()  # documents: BOS pooled, no instruction
    # "PB" is alpha's negative and beta's positive: it carries beta's group, so the loss masks it for beta.
    assert b.doc_groups.tolist()[1] == b.query_groups.tolist()[1]


def test_held_out_files_are_refused(tmp_path):
    (tmp_path / "dev").mkdir()
    f = tmp_path / "dev" / "x.jsonl"
    f.write_text('{"query": "a", "positive": "b"}\n')
    with pytest.raises(InputError, match="held out"):
        TrainData([DataSource(str(f))], 0, 0)


def test_config_formats_and_unknown_keys(tmp_path):
    body = {"output_dir": "o", "tokenizer": "t", "data": [{"path": "x.jsonl"}], "lr": 1e-3,
            "lora": {"enabled": True, "r": 8}}
    (tmp_path / "c.json").write_text(json.dumps(body))
    (tmp_path / "c.yaml").write_text("output_dir: o\ntokenizer: t\ndata:\n  - path: x.jsonl\nlr: 0.001\nlora:\n  enabled: true\n  r: 8\n")
    (tmp_path / "c.toml").write_text('output_dir = "o"\ntokenizer = "t"\nlr = 0.001\n[[data]]\npath = "x.jsonl"\n'
                                     '[lora]\nenabled = true\nr = 8\n')
    cfgs = [TrainConfig.from_file(tmp_path / n) for n in ("c.json", "c.yaml", "c.toml")]
    assert cfgs[0] == cfgs[1] == cfgs[2] and cfgs[0].lora.r == 8 and cfgs[0].lora.alpha == 32
    with pytest.raises(InputError, match="unknown keys"):
        TrainConfig.from_dict({**body, "learning_rate": 1})
    with pytest.raises(InputError, match="tokenizer"):
        TrainConfig.from_dict({"output_dir": "o", "data": ["x.jsonl"]})
