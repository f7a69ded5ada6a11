"""Data-parallel training on the CPU: two gloo processes end where one process with the same global batch ends."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_train_loop import _cfg, write_pairs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    from nvembed_sdk.train.config import TrainConfig
    from nvembed_sdk.train.dist import exit_rank, shutdown_dist
    from nvembed_sdk.train.loop import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(TrainConfig.from_dict(cfg_dict), log=lambda s: None)
    # As `nvembed train` ends a rank: a gloo process left to the interpreter's teardown could abort
    # (SIGABRT, "terminate called without an active exception") after a finished run.
    shutdown_dist()
    exit_rank()


def test_two_gloo_ranks_match_one_process(tmp_path, tiny_tokenizer_dir):
    from nvembed_sdk.train.loop import train

    synthetic_pairs = write_pairs(tmp_path / "pairs.jsonl")

    over = {"max_steps": 3, "batch_size": 8, "num_negatives": 1, "lr": 3e-3}
    single = train(_cfg(tmp_path / "one", synthetic_pairs, tiny_tokenizer_dir, **over), log=lambda s: None)
    cfg = _cfg(tmp_path / "two", synthetic_pairs, tiny_tokenizer_dir, **over)
    mp.spawn(_worker, args=(2, _free_port(), cfg.to_dict()), nprocs=2, join=True)
    a = load_file(str(Path(single["final_dir"]) / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
