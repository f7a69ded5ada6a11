"""nvembed grow (nvembed_sdk.train.grow): widening the decoder MLPs keeps the embeddings and leaves the new units trainable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvembed_sdk import Embedder
from nvembed_sdk.checkpoint import load_model
from nvembed_sdk.cli import main
from nvembed_sdk.errors import InputError
from nvembed_sdk.train import grow as grow_module

from conftest import SAMPLE_TEXTS, assert_close_cos

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "grow_model.py"  # the old command, a shim now


def _grow_module():
    return grow_module


def _nvembed_grow(*args: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["grow", *args])
    assert exc.value.code == 0


def test_grown_checkpoint_embeds_like_the_original(tiny_checkpoint, tmp_path):
    out = tmp_path / "grown"
    width = load_model(tiny_checkpoint).cfg.text.intermediate_size
    _nvembed_grow("--model", str(tiny_checkpoint), "--intermediate-size", str(2 * width), "--output", str(out))
    grown = load_model(out)
    assert grown.cfg.text.intermediate_size == 2 * width
    mlp = grown.decoder.layers[0].mlp
    assert mlp.gate_proj.weight.shape[0] == 2 * width and mlp.down_proj.weight.shape[1] == 2 * width
    assert torch.count_nonzero(mlp.down_proj.weight[:, width:]) == 0  # new units contribute nothing yet
    assert mlp.gate_proj.weight[width:].std() > 0 and mlp.up_proj.weight[width:].std() > 0
    # the grown bundle loads through the public API with its tokenizer and embeds like the original
    a = Embedder.load(tiny_checkpoint, device="cpu").embed(SAMPLE_TEXTS)
    b = Embedder.load(out, device="cpu").embed(SAMPLE_TEXTS)
    assert_close_cos(a, b, 0.999999)


def test_new_units_receive_gradient(tiny_model):
    grow = _grow_module()
    width = tiny_model.cfg.text.intermediate_size
    grown = grow.grow_mlp(tiny_model, width + 8).train()
    ids = torch.randint(3, grown.cfg.text.vocab_size, (4, 12))
    mask = torch.ones_like(ids)
    emb = grown(ids, mask, mask)
    (emb[0] @ emb[1:].T).sum().backward()
    down = grown.decoder.layers[0].mlp.down_proj.weight.grad  # (D, N)
    assert down[:, width:].abs().sum() > 0


def test_shrinking_is_refused(tiny_model):
    grow = _grow_module()
    with pytest.raises(InputError, match="below the current"):
        grow.grow_mlp(tiny_model, tiny_model.cfg.text.intermediate_size - 1)


def test_inserted_layers_start_as_identity(tiny_checkpoint, tmp_path):
    out = tmp_path / "deeper"
    n = load_model(tiny_checkpoint).cfg.text.num_hidden_layers
    subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_checkpoint), "--layers", str(n + 1),
                    "--output", str(out)], check=True, capture_output=True)
    grown = load_model(out)
    assert grown.cfg.text.num_hidden_layers == n + 1
    sources = _grow_module().layer_sources(n, n + 1)
    new = [i for i in range(1, n + 1) if sources[i] == sources[i - 1]]
    assert len(new) == 1
    layer = grown.decoder.layers[new[0]]
    assert torch.count_nonzero(layer.attn.o_proj.weight) == 0 and torch.count_nonzero(layer.mlp.down_proj.weight) == 0
    assert layer.attn.q_proj.weight.abs().sum() > 0  # copied, not blank
    a = Embedder.load(tiny_checkpoint, device="cpu").embed(SAMPLE_TEXTS)
    b = Embedder.load(out, device="cpu").embed(SAMPLE_TEXTS)
    assert_close_cos(a, b, 0.999999)


def test_layer_sources_spread_the_copies():
    grow = _grow_module()
    assert grow.layer_sources(4, 6) == [0, 1, 1, 2, 3, 3]
    assert grow.layer_sources(4, 5) == [0, 1, 2, 3, 3]
    assert grow.layer_sources(3, 3) == [0, 1, 2]
    with pytest.raises(InputError, match="at most twice"):
        grow.layer_sources(2, 5)


def test_inserted_layers_receive_gradient(tiny_model):
    grow = _grow_module()
    n = tiny_model.cfg.text.num_hidden_layers
    grown, sources = grow.grow_layers(tiny_model, n + 1)
    grown.train()
    ids = torch.randint(3, grown.cfg.text.vocab_size, (4, 12))
    mask = torch.ones_like(ids)
    emb = grown(ids, mask, mask)
    (emb[0] @ emb[1:].T).sum().backward()
    new = next(i for i in range(1, n + 1) if sources[i] == sources[i - 1])
    assert grown.decoder.layers[new].attn.o_proj.weight.grad.abs().sum() > 0
    assert grown.decoder.layers[new].mlp.down_proj.weight.grad.abs().sum() > 0


def test_fewer_layers_is_refused(tiny_model):
    grow = _grow_module()
    with pytest.raises(InputError, match="below the current"):
        grow.grow_layers(tiny_model, tiny_model.cfg.text.num_hidden_layers - 1)


def test_nothing_to_do_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["grow", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "g")])
    assert exc.value.code != 0 and "--intermediate-size and/or --layers" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
