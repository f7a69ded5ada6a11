"""TrainConfig's ``distill`` group: the grouped form, the flat keys of older stage files, and the shipped files."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch

from nvembed_sdk.errors import InputError
from nvembed_sdk.train.config import LEGACY_DISTILL_KEYS, DistillSettings, TrainConfig
from nvembed_sdk.train.losses import (
    StageLoss,
    compute_loss_from_embeddings,
    embedding_distill_loss,
    info_nce_logits,
    info_nce_loss,
    score_distill_loss,
)

BASE = {"output_dir": "out", "tokenizer": "tok", "data": ["a.jsonl"]}
ROOT = Path(__file__).resolve().parents[2]


def test_flat_distill_keys_read_into_the_group():
    flat = TrainConfig.from_dict({**BASE, "teacher": "minilm", "teacher_cache": "c", "teacher_max_length": 96,
                                  "embed_distill_weight": 10.0, "distill_texts": "t.jsonl", "distill_batch_size": 8,
                                  "init_token_embeddings": True, "distill_weight": 0.5, "distill_temperature": 2.0})
    grouped = TrainConfig.from_dict({**BASE, "distill": {
        "teacher": "minilm", "cache": "c", "teacher_max_length": 96, "embedding_weight": 10.0, "texts": ["t.jsonl"],
        "texts_per_step": 8, "init_token_embeddings": True, "score_weight": 0.5, "score_temperature": 2.0}})
    assert flat == grouped
    assert flat.distill == DistillSettings("minilm", "c", 96, 10.0, ("t.jsonl",), 8, True, 0.5, 2.0)
    # every field that existed before the group has its flat key; later fields live in the group only
    group_only = {"align_projection", "relation_weight", "relation_temperature"}
    assert set(LEGACY_DISTILL_KEYS.values()) == set(DistillSettings.__dataclass_fields__) - group_only
    # what a run writes (train_config.json) reads back to the same config
    assert TrainConfig.from_dict(flat.to_dict()) == flat
    assert "teacher" not in flat.to_dict() and flat.to_dict()["distill"]["embedding_weight"] == 10.0


def test_a_setting_given_both_ways_or_unknown_is_refused():
    with pytest.raises(InputError, match="not both"):
        TrainConfig.from_dict({**BASE, "teacher": "minilm", "distill": {"teacher": "other"}})
    # the same value both ways is not a conflict (a --set override of a flat file)
    assert TrainConfig.from_dict({**BASE, "teacher": "minilm", "distill": {"teacher": "minilm"}}).distill.teacher == "minilm"
    with pytest.raises(InputError, match="unknown keys"):
        TrainConfig.from_dict({**BASE, "distill": {"embed_distill_weight": 1.0}})
    with pytest.raises(InputError, match="distill.score_temperature"):
        TrainConfig.from_dict({**BASE, "distill": {"score_temperature": 0}})


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "models" / "*" / "train_stage*.json"))))
def test_shipped_stage_files_still_read(path):
    cfg = TrainConfig.from_file(path)
    assert cfg.distill.teacher == "minilm" and cfg.distill.embedding_weight > 0


def test_losses_compose_to_the_combined_loss():
    g = torch.Generator().manual_seed(0)
    B, K, D = 4, 2, 8
    q, d = torch.randn(B, D, generator=g), torch.randn(B * (1 + K), D, generator=g)
    teacher = torch.randn(B, 1 + K, generator=g)
    for in_batch in (True, False):
        kw = {"temperature": 0.05, "in_batch_negatives": in_batch}
        own = info_nce_logits(q, d, K, **kw).own
        want = info_nce_loss(q, d, K, **kw) + 0.3 * score_distill_loss(own, teacher, temperature=2.0)
        got = compute_loss_from_embeddings(q, d, K, 0.05, in_batch, teacher_scores=teacher, distill_weight=0.3,
                                           distill_temperature=2.0)
        assert torch.equal(got, want)
    batch = type("B", (), {"num_negatives": K, "query_groups": None, "doc_groups": None, "teacher_scores": None})()
    targets = (torch.nn.functional.normalize(torch.randn(B * (2 + K), D, generator=g), dim=-1),
               torch.tensor([True, False] * ((B * (2 + K)) // 2)))
    stage = StageLoss(temperature=0.05, in_batch_negatives=True, embedding_weight=2.0)
    want = info_nce_loss(q, d, K) + 2.0 * embedding_distill_loss(torch.cat([q, d]), *targets)
    assert torch.equal(stage(q, d, batch, targets), want)
    assert torch.equal(StageLoss(temperature=0.05, in_batch_negatives=True)(q, d, batch, targets), info_nce_loss(q, d, K))


def test_the_card_fine_tune_example_reads(monkeypatch):
    """examples/finetune_pairs.json (the card's "Fine-tune on your own pairs") is a valid stage
    whose data and start model exist; the card's run of it is checked by hand (CPU minutes)."""
    from nvembed_sdk.train.data import TrainData

    monkeypatch.chdir(ROOT)  # the card runs it from the repository root
    cfg = TrainConfig.from_file("examples/finetune_pairs.json")
    assert cfg.init == "nvembed" and Path(cfg.init_path, "model.safetensors").is_file()
    assert Path(cfg.tokenizer_dir, "tokenizer.json").is_file()
    _, batches = TrainData(cfg.data, cfg.num_negatives, cfg.seed).epoch_batches(0, cfg.batch_size)
    assert len(batches) >= 2


def test_relation_term_settings_are_checked():
    with pytest.raises(InputError, match="relation_weight"):
        TrainConfig.from_dict({**BASE, "distill": {"relation_weight": 1.0}})  # no teacher
    with pytest.raises(InputError, match="relation_temperature"):
        TrainConfig.from_dict({**BASE, "distill": {"teacher": "minilm", "relation_weight": 1.0,
                                                   "relation_temperature": 0}})
    cfg = TrainConfig.from_dict({**BASE, "distill": {"teacher": "minilm", "relation_weight": 1.0}})
    assert (cfg.distill.relation_weight, cfg.distill.relation_temperature) == (1.0, 0.05)
