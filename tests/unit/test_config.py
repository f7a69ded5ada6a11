from __future__ import annotations

import json

import pytest

from nvembed_sdk.config import PRESETS, NVEmbedConfig
from nvembed_sdk.errors import ArtifactError


def test_released_config_reads_exactly(reference_dir):
    cfg = NVEmbedConfig.from_file(reference_dir)
    assert cfg == PRESETS["nv-embed-v2"].replace(torch_dtype="float16")
    assert cfg.text.head_dim == 128 and cfg.text.num_key_value_heads == 8
    assert cfg.latent.num_latents_value == 512 and cfg.latent.cross_dim_head == 4096
    assert cfg.num_parameters == 7_851_016_192
    assert cfg.text.num_parameters == 7_110_660_096
    assert cfg.latent.num_parameters == 740_356_096


def test_parameter_count_matches_index_bytes(reference_dir):
    index = json.loads((reference_dir / "model.safetensors.index.json").read_text())
    assert NVEmbedConfig.from_file(reference_dir).num_parameters * 2 == index["metadata"]["total_size"]


def test_round_trip_keeps_released_format(reference_dir, tmp_path):
    raw = json.loads((reference_dir / "config.json").read_text())
    cfg = NVEmbedConfig.from_dict(raw)
    cfg.save(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    for key in ("model_type", "architectures", "auto_map", "padding_side", "is_mask_instruction", "add_eos"):
        assert written[key] == raw[key]
    assert written["text_config"]["model_type"] == "bidir_mistral"
    assert written["latent_attention_config"]["model_type"] == "latent_attention"
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "rope_theta", "sliding_window", "eos_token_id"):
        assert written["text_config"][key] == raw["text_config"][key]
    assert "head_dim" not in written["text_config"]  # implicit, as in the release
    assert NVEmbedConfig.from_file(tmp_path) == cfg


def test_missing_latent_fields_take_released_defaults():
    cfg = NVEmbedConfig.from_dict({"text_config": {"hidden_size": 4096}, "latent_attention_config": {"model_type": "latent_attention"}})
    assert cfg.latent == PRESETS["nv-embed-v2"].latent


def test_explicit_latent_fields_are_read():
    cfg = NVEmbedConfig.from_dict({
        "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
        "latent_attention_config": {"model_type": "latent_attention", "num_latents_value": 8, "cross_dim_head": 16,
                                    "num_cross_heads": 2, "latent_dim": 64, "hidden_dim": 64},
    })
    assert (cfg.latent.num_latents_value, cfg.latent.cross_dim_head, cfg.text.head_dim) == (8, 16, 16)


def test_inconsistent_widths_raise():
    with pytest.raises(ArtifactError, match="latent_dim"):
        NVEmbedConfig.from_dict({"text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
                                 "latent_attention_config": {"latent_dim": 32, "hidden_dim": 32}})


def test_not_a_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ArtifactError, match="text_config"):
        NVEmbedConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="invalid JSON"):
        NVEmbedConfig.from_file(tmp_path)
