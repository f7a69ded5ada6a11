from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvembed_sdk.checkpoint import FROM_RELEASED, load_model, save_model, state_dict_released, to_ours
from nvembed_sdk.errors import ArtifactError


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.cfg.text.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_released_key_names(reference_dir, tiny_model):
    released = set(json.loads((reference_dir / "model.safetensors.index.json").read_text())["weight_map"])
    assert len(released) == 304
    for key in released:
        assert to_ours(key) is not None  # every released key maps
    # our tiny model's keys are a subset of the same naming scheme
    ours = set(state_dict_released(tiny_model))
    assert {k for k in ours if "layers.0." in k or "layers" not in k} <= released


def test_round_trip_single_and_sharded(tiny_model, tmp_path):
    ids, mask = _inputs(tiny_model)
    with torch.no_grad():
        ref = tiny_model(ids, mask, mask)
    save_model(tiny_model, tmp_path / "single")
    save_model(tiny_model, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for sub in ("single", "sharded"):
        loaded = load_model(tmp_path / sub)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, mask, mask), ref)


@pytest.mark.parametrize("stored,target", [("float16", torch.float32), ("bfloat16", torch.float32),
                                           ("float32", torch.bfloat16), ("float16", torch.float16)])
def test_dtype_policy(tiny_model, tmp_path, stored, target):
    save_model(tiny_model, tmp_path, dtype=stored)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == stored
    m = load_model(tmp_path, dtype=target)
    assert {p.dtype for p in m.parameters()} == {target}
    assert not any(p.requires_grad for p in m.parameters())


def _rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_key_is_named(tiny_checkpoint_copy):
    _rewrite(tiny_checkpoint_copy, lambda t: t.pop("latent_attention_model.latents"))
    with pytest.raises(ArtifactError, match="latent_attention_model.latents"):
        load_model(tiny_checkpoint_copy)


def test_unexpected_key_is_named(tiny_checkpoint_copy):
    _rewrite(tiny_checkpoint_copy, lambda t: t.__setitem__("lm_head.weight", torch.zeros(2, 2)))
    with pytest.raises(ArtifactError, match="lm_head.weight"):
        load_model(tiny_checkpoint_copy)


def test_extra_layer_key_is_named(tiny_checkpoint_copy):
    key = "embedding_model.layers.9.input_layernorm.weight"
    _rewrite(tiny_checkpoint_copy, lambda t: t.__setitem__(key, torch.ones(64)))
    with pytest.raises(ArtifactError, match="layers.9"):
        load_model(tiny_checkpoint_copy)


def test_rotary_buffers_are_dropped(tiny_checkpoint_copy):
    key = "embedding_model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite(tiny_checkpoint_copy, lambda t: t.__setitem__(key, torch.ones(8)))
    assert load_model(tiny_checkpoint_copy).decoder.inv_freq.shape == (8,)


def test_misshaped_key_is_named(tiny_checkpoint_copy):
    key = "embedding_model.layers.1.mlp.up_proj.weight"
    _rewrite(tiny_checkpoint_copy, lambda t: t.__setitem__(key, torch.zeros(3, 3)))
    with pytest.raises(ArtifactError, match=r"up_proj.*shape \(3, 3\)"):
        load_model(tiny_checkpoint_copy)


def test_corrupt_and_missing_files(tiny_checkpoint_copy, tmp_path):
    (tiny_checkpoint_copy / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ArtifactError, match="safetensors"):
        load_model(tiny_checkpoint_copy)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tiny_checkpoint_copy / "config.json").read_text())
    with pytest.raises(ArtifactError, match="no model.safetensors"):
        load_model(tmp_path / "empty")


def test_missing_shard_is_named(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path, max_shard_bytes=100_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(ArtifactError, match=victim.name):
        load_model(tmp_path)


def test_key_table_is_explicit():
    assert all(k.startswith(("embedding_model.", "latent_attention_model.")) for k in FROM_RELEASED)
    with pytest.raises(ArtifactError, match="unexpected key"):
        to_ours("model.layers.0.mlp.up_proj.weight")


def test_mistral_key_table_is_the_decoder_part_of_the_released_one():
    from nvembed_sdk.checkpoint import FROM_MISTRAL_CAUSAL_LM, MISTRAL_CAUSAL_LM

    decoder = {k: v for k, v in FROM_RELEASED.items() if k.startswith("embedding_model.")}
    assert {"embedding_model." + k[len("model."):]: v for k, v in FROM_MISTRAL_CAUSAL_LM.items()
            if k != "lm_head.weight"} == decoder
    assert MISTRAL_CAUSAL_LM.to_ours("model.layers.3.mlp.up_proj.weight") == "decoder.layers.3.mlp.up_proj.weight"
    assert MISTRAL_CAUSAL_LM.to_ours("lm_head.weight") is None
    with pytest.raises(ArtifactError, match="Mistral causal-LM"):
        MISTRAL_CAUSAL_LM.to_ours("latent_attention_model.latents")
