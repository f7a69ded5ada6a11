"""FSDP2 full fine-tuning on the CPU: two gloo ranks end where one process with the same global batch ends.

Both runs go through the real launcher (``torchrun`` = ``python -m torch.distributed.run``,
``nvembed train CONFIG``): one with GradCache on; one stopped after 2 steps and resumed from its
gathered, released-layout checkpoint. Both are compared with the single-process run: the loss
curve and the final weights within fp32 tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_ddp import _free_port
from test_train_loop import _cfg, write_pairs

from nvembed_sdk.errors import InputError

OVER = {"max_steps": 4, "batch_size": 8, "num_negatives": 1, "lr": 3e-3, "checkpoint_every_steps": 100}


def _torchrun(cfg_file: Path, *extra: str) -> str:
    """``torchrun --nproc-per-node 2 $(which nvembed) train CONFIG`` (the launcher as a module: the
    test venv may have no torchrun script on PATH)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "nvembed_sdk.cli", "train", str(cfg_file), *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


def _losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_tokenizer_dir):
    from nvembed_sdk.train.loop import train

    root = tmp_path_factory.mktemp("fsdp")
    pairs = write_pairs(root / "pairs.jsonl")
    res = train(_cfg(root / "one", pairs, tiny_tokenizer_dir, **OVER), log=lambda s: None)
    return root, pairs, res


def test_fsdp_under_torchrun_matches_one_process(single, tiny_tokenizer_dir):
    root, pairs, res = single
    cfg = _cfg(root / "torchrun", pairs, tiny_tokenizer_dir, **OVER, distributed="fsdp", gradcache_chunk=2)
    (root / "fsdp.json").write_text(cfg.to_json())
    assert "world 2" in _torchrun(root / "fsdp.json")
    want = [h["loss"] for h in res["history"]]
    assert len(want) == OVER["max_steps"]
    assert _losses(root / "torchrun") == pytest.approx(want, rel=1e-4)
    _assert_same_weights(Path(res["final_dir"]), root / "torchrun" / "final")


def test_fsdp_checkpoint_resumes_exactly(single, tiny_tokenizer_dir):
    from nvembed_sdk.checkpoint import load_model

    root, pairs, res = single
    cfg = _cfg(root / "resume", pairs, tiny_tokenizer_dir, **OVER, distributed="fsdp")
    (root / "resume.json").write_text(cfg.to_json())
    _torchrun(root / "resume.json", "--stop-after-steps", "2")
    ckpt = root / "resume" / "checkpoints" / "step-000002"
    assert load_model(ckpt).cfg.dim > 0 and not (root / "resume" / "final").exists()  # released layout, gathered
    assert "resumed from" in _torchrun(root / "resume.json", "--resume")
    assert _losses(root / "resume") == pytest.approx([h["loss"] for h in res["history"]], rel=1e-4)
    _assert_same_weights(Path(res["final_dir"]), root / "resume" / "final")


def test_fsdp_refuses_what_it_cannot_shard(tmp_path, tiny_tokenizer_dir):
    from nvembed_sdk.train.fsdp import check_config

    pairs = write_pairs(tmp_path / "p.jsonl", n=16)
    cfg = _cfg(tmp_path / "x", pairs, tiny_tokenizer_dir, distributed="fsdp")
    with pytest.raises(InputError, match="nproc-per-node"):
        check_config(cfg, 1)
    with pytest.raises(InputError, match="LoRA"):
        check_config(cfg.replace(lora=cfg.lora.__class__(enabled=True)), 2)
    with pytest.raises(InputError, match="divisible"):
        check_config(cfg.replace(batch_size=6), 4)
    with pytest.raises(InputError, match="'ddp' or 'fsdp'"):
        _cfg(tmp_path / "y", pairs, tiny_tokenizer_dir, distributed="zero3")
