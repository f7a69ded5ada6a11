"""The training loop on tiny models: resume equality, LoRA, Mistral init, and two stages on real data."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvembed_sdk.checkpoint import load_model
from nvembed_sdk.train.config import TrainConfig
from nvembed_sdk.train.data import write_jsonl
from nvembed_sdk.train.loop import STATE_FILE, apply_lora, build_model, checkpoint_dirs, load_mistral, train

from conftest import DATA, needs_shared

WORDS = ["audio", "video", "image", "font", "mail", "shell", "editor", "python", "perl", "rust", "haskell", "java", "kernel", "network", "printer", "scanner", "camera", "music", "game", "chess", "physics", "chemistry", "biology", "math", "database", "server", "client"]


def write_pairs(path: Path, n: int = 160) -> Path:
    """Lexical pairs a tiny model learns in a few steps; every 4 records share a group."""
    rng = random.Random(0)
    recs = []
    for i in range(n):
        a, b, c = rng.sample(WORDS, 3)
        recs.append({"query": f"{a} {b} tools", "positive": f"This package provides {a} and {b} support for {c}.",
                     "negatives": [f"Utilities for {c} only."], "group": f"g{i // 4}", "task": "retrieval",
                     "instruction": "Given a summary, retrieve the description"})
    write_jsonl(path, recs)
    return path


@pytest.fixture(scope="session")
def synthetic_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("syn") / "pairs.jsonl")


def _cfg(out: Path, data: Path, tokenizer: Path, **over) -> TrainConfig:
    base = {"output_dir": str(out), "init": "scratch", "tokenizer": str(tokenizer), "model": {"preset": "tiny-test"},
            "data": [{"path": str(data)}], "num_negatives": 1, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2,
            "max_steps": 6, "log_every_steps": 1, "checkpoint_every_steps": 100, "query_max_length": 24,
            "doc_max_length": 32, "num_threads": 1}
    return TrainConfig.from_dict({**base, **over})


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_resumed_run_ends_with_the_same_weights(tmp_path, synthetic_pairs, tiny_tokenizer_dir):
    full = train(_cfg(tmp_path / "a", synthetic_pairs, tiny_tokenizer_dir), log=lambda s: None)
    part = train(_cfg(tmp_path / "b", synthetic_pairs, tiny_tokenizer_dir), stop_after_steps=3, log=lambda s: None)
    assert part["final_dir"] is None and [p.name for p in checkpoint_dirs(tmp_path / "b")] == ["step-000003"]
    state = torch.load(tmp_path / "b/checkpoints/step-000003" / STATE_FILE, weights_only=False)
    assert {"optimizer", "scheduler", "rng", "epoch", "batch_in_epoch"} <= set(state)
    resumed = train(_cfg(tmp_path / "b", synthetic_pairs, tiny_tokenizer_dir), resume=True, log=lambda s: None)
    assert resumed["step"] == full["step"] == 6
    a, b = _weights(Path(full["final_dir"])), _weights(Path(resumed["final_dir"]))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"]], abs=1e-5)


def test_lora_trains_only_lora_and_head_then_merges(tmp_path, synthetic_pairs, tiny_checkpoint):
    cfg = _cfg(tmp_path / "lora", synthetic_pairs, tiny_checkpoint, init="nvembed", init_path=str(tiny_checkpoint),
               lora={"enabled": True, "r": 4, "alpha": 8}, lr=1e-2, max_steps=4)
    peft_model = apply_lora(build_model(cfg, 600, torch.device("cpu")), cfg)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".head." in n for n in trainable)
    assert any(".head." in n for n in trainable) and any("lora_A" in n for n in trainable)

    out = train(cfg, log=lambda s: None)
    init, final = _weights(tiny_checkpoint), _weights(Path(out["final_dir"]))
    assert init.keys() == final.keys()
    changed = {k for k in init if not torch.equal(init[k], final[k])}
    assert any("q_proj" in k for k in changed) and any(k.startswith("latent_attention_model.") for k in changed)
    assert not any("layernorm" in k or "embed_tokens" in k for k in changed)  # not adapted, not trained

    # The saved (merged) model equals the adapter model it came from.
    state = torch.load(checkpoint_dirs(tmp_path / "lora")[-1] / STATE_FILE, weights_only=False)
    live = apply_lora(build_model(cfg, 600, torch.device("cpu")), cfg)
    named = dict(live.named_parameters())
    with torch.no_grad():
        for n, v in state["trainable"].items():
            named[n].copy_(v)
    live.eval()
    merged = load_model(out["final_dir"])
    ids = torch.randint(3, 600, (3, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, mask, mask), live(ids, mask, mask), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(live.merge_and_unload()(ids, mask, mask), merged(ids, mask, mask),
                                   rtol=1e-5, atol=1e-5)


def test_mistral_causal_lm_init(tmp_path, tiny_model):
    cfg = tiny_model.cfg
    src = tmp_path / "mistral"
    src.mkdir()
    t = cfg.text
    (src / "config.json").write_text(json.dumps({
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta}))
    from nvembed_sdk.checkpoint import state_dict_released

    tensors = {"model." + k[len("embedding_model."):]: v.contiguous() for k, v in state_dict_released(tiny_model).items()
               if k.startswith("embedding_model.")}
    tensors["lm_head.weight"] = torch.zeros(t.vocab_size, t.hidden_size)
    save_file(tensors, str(src / "model.safetensors"))
    model = load_mistral(src, {"num_latents_value": 8, "num_cross_heads": 2, "cross_dim_head": 16})
    for name, p in tiny_model.decoder.named_parameters():
        assert torch.equal(model.decoder.get_parameter(name), p), name
    assert model.head.latents.shape == (8, t.hidden_size) and torch.isfinite(model.head.latents).all()
    assert all(p.requires_grad for p in model.parameters())
    # the shared strict loader names a key the Mistral table does not know, and a missing weight
    from nvembed_sdk.errors import ArtifactError

    save_file({**tensors, "model.layers.0.self_attn.extra.weight": torch.zeros(2)}, str(src / "model.safetensors"))
    with pytest.raises(ArtifactError, match="extra.weight.*Mistral causal-LM"):
        load_mistral(src)
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, str(src / "model.safetensors"))
    with pytest.raises(ArtifactError, match="model.norm.weight"):
        load_mistral(src)


def _subset(src: Path, dst: Path, n: int, seed: int = 0) -> Path:
    with gzip.open(src, "rt", encoding="utf-8") as fh:
        lines = fh.readlines()
    keep = random.Random(seed).sample(lines, n)
    dst.write_text("".join(keep), encoding="utf-8")
    return dst


def test_two_stages_on_shared_data(tmp_path):
    """Stage 1 (retrieval, in-batch + hard negatives) then stage 2 (retrieval + example-based
    sections, in-batch off) on a small subset: the loss falls and the dev nDCG@10 rises."""
    needs_shared(DATA / "train" / "debian-packages.jsonl.gz")
    from nvembed_sdk.tokenizer_train import train_tokenizer
    from nvembed_sdk.train.data import texts_for_tokenizer

    train_dir = tmp_path / "train"
    train_dir.mkdir()
    dp = _subset(DATA / "train" / "debian-packages.jsonl.gz", train_dir / "debian-packages.jsonl", 1200)
    ds = _subset(DATA / "train" / "debian-sections.jsonl.gz", train_dir / "debian-sections.jsonl", 1500)
    tok = tmp_path / "tok"
    train_tokenizer(texts_for_tokenizer([dp, ds]), vocab_size=2000, output_dir=tok)
    common = {"eval": {"beir_dir": str(DATA / "dev" / "debpkg"), "every_steps": 1000, "max_queries": 150,
                       "max_corpus": 400, "batch_size": 64}, "batch_size": 32, "doc_max_length": 64,
              "query_max_length": 40, "log_every_steps": 5}
    s1 = train(_cfg(tmp_path / "s1", dp, tok, max_steps=40, lr=1e-3, warmup_steps=3, **common), log=lambda s: None)
    losses = [h["loss"] for h in s1["history"]]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    assert s1["evals"][-1]["ndcg@10"] > s1["evals"][0]["ndcg@10"] + 0.02

    s2_cfg = _cfg(tmp_path / "s2", dp, tok, init="nvembed", init_path=s1["final_dir"], max_steps=20, lr=5e-4,
                  warmup_steps=2, in_batch_negatives=False, num_negatives=3, **common).replace(
        data=TrainConfig.from_dict({"output_dir": "x", "tokenizer": "x", "data": [
            {"path": str(dp), "max_examples": 400},
            {"path": str(ds), "task": "classification", "max_examples": 300},
            {"path": str(ds), "task": "clustering", "max_examples": 200}]}).data)
    s2 = train(s2_cfg, log=lambda s: None)
    losses = [h["loss"] for h in s2["history"]]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    from nvembed_sdk import Embedder

    with Embedder.load(s2["final_dir"]) as emb:
        v = emb.embed_queries(["a text editor"], task="Find it")
    assert v.shape == (1, 64)


def test_head_dim_is_always_derived():
    from nvembed_sdk.errors import InputError
    from nvembed_sdk.train.startup import scratch_config

    cfg = scratch_config({"preset": "tiny-test", "hidden_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2},
                         vocab_size=300)
    assert cfg.text.head_dim == 24  # not the preset's own head_dim
    with pytest.raises(InputError, match="head_dim"):
        scratch_config({"preset": "tiny-test", "hidden_size": 96, "num_attention_heads": 4, "head_dim": 32}, 300)
