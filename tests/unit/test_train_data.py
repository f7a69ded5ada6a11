"""Training data rules: no clashes in a batch, example-based pairs, instructions, group ids, configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nvembed_sdk.errors import InputError
from nvembed_sdk.text import TextPipeline
from nvembed_sdk.train.config import DataSource, TrainConfig
from nvembed_sdk.train.data import (
    Example,
    TrainData,
    build_section_pairs,
    check_training_path,
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


def test_held_out_guard_is_keyed_to_the_held_out_folders_not_folder_names(tmp_path, monkeypatch):
    held = tmp_path / "shipped" / "dev"
    held.mkdir(parents=True)
    f = held / "x.jsonl"
    f.write_text('{"query": "a", "positive": "b"}\n')
    monkeypatch.setenv("NVEMBED_HELD_OUT", str(held))  # stands in for ../shared/data/dev
    with pytest.raises(InputError, match="held out"):
        TrainData([DataSource(str(f))], 0, 0)
    copy = tmp_path / "mine" / "copy.jsonl"  # a byte-identical copy elsewhere is refused too
    copy.parent.mkdir()
    copy.write_bytes(f.read_bytes())
    with pytest.raises(InputError, match="copy of the held-out"):
        TrainData([DataSource(str(copy))], 0, 0)
    # A user's own project folder named dev/ (or calibration/) is not held out.
    own = tmp_path / "project" / "dev" / "pairs.jsonl"
    own.parent.mkdir(parents=True)
    own.write_text('{"query": "my own query", "positive": "my own document"}\n')
    assert len(TrainData([DataSource(str(own))], 0, 0).epoch_examples(0)) == 1


def test_shipped_dev_folder_and_held_out_sources_are_refused(tmp_path):
    from nvembed_sdk.train.data import held_out_roots, is_held_out_source, read_debian_packages

    shipped = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dev"
    if shipped.is_dir():
        assert shipped.resolve() in held_out_roots()
        with pytest.raises(InputError, match="held out"):
            check_training_path(next(p for p in shipped.rglob("*") if p.is_file()))
    # Records from a Debian source package of the dev split (the data README's hash rule).
    held = next(f"pkg{i}" for i in range(1000) if is_held_out_source(f"pkg{i}"))
    kept = next(f"pkg{i}" for i in range(1000) if not is_held_out_source(f"pkg{i}"))
    f = tmp_path / "debian-packages.jsonl"
    f.write_text(json.dumps({"query": "q", "positive": "p", "source": kept}) + "\n")
    assert len(read_debian_packages(f)) == 1
    f.write_text(json.dumps({"query": "q", "positive": "p", "source": held}) + "\n")
    with pytest.raises(InputError, match="reserved for dev"):
        read_debian_packages(f)


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
