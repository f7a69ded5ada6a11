"""A run's state on disk: step checkpoints, the output directory, the trainer state and RNG states.

A step checkpoint is a released-layout model directory plus ``trainer_state.pt`` (optimiser,
scheduler, data position, RNG states, history) and ``run.json`` (the run id), written to a
temporary directory and renamed, so a crash leaves the previous checkpoint whole. Resuming
restores every one of them, which is what makes a resumed run bit-exact.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nvembed_sdk.checkpoint import save_model, save_torch
from nvembed_sdk.errors import ArtifactError, InputError, TrainingDiverged, fmt, writing
from nvembed_sdk.text import TextPipeline
from nvembed_sdk.train.config import TrainConfig
from nvembed_sdk.train.startup import MergedView

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
RUN_FILE = "run.json"  # {"run_id": ...} in each step checkpoint: pruning only touches its own run's


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def write_model_dir(model: nn.Module, out: Path, text: TextPipeline, cfg: TrainConfig,
                    dtype: str = "float32", extra: dict[str, Any] | None = None, run_id: str | None = None) -> None:
    """Released layout + tokenizer + the stage config, written to a temp dir then renamed."""
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    view = MergedView(model) if hasattr(model, "get_base_model") else model
    with writing(out, "checkpoint"):  # a full or read-only disk: one line, no half-written temp dir
        try:
            save_model(view, tmp, dtype=dtype)  # type: ignore[arg-type]
            text.save(tmp)
            (tmp / CONFIG_FILE).write_text(cfg.to_json(), encoding="utf-8")
            if extra is not None:
                save_torch(extra, tmp / STATE_FILE)  # a full disk: OSError, not torch's RuntimeError
            if run_id is not None:
                (tmp / RUN_FILE).write_text(json.dumps({"run_id": run_id}) + "\n", encoding="utf-8")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if out.exists():
        old = out.with_name(f".old-{out.name}")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def run_id_of(checkpoint: Path) -> str | None:
    """The run a step checkpoint belongs to (None: written before run ids, or unreadable)."""
    try:
        return str(json.loads((checkpoint / RUN_FILE).read_text(encoding="utf-8"))["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, main: bool = True) -> None:
    """Refuse to start a new run over another run's checkpoints or final model.

    A fresh run in a finished run's directory used to have its new checkpoints pruned as older
    than the old run's, and a later ``--resume`` continued the old run.

    Raises:
        InputError: ``out`` holds checkpoints or ``final/`` and neither ``resume`` nor ``overwrite``.
    """
    if resume and overwrite:
        raise InputError(fmt("--resume and --overwrite", "both", "one of them: continue the run, or replace it"))
    if resume:
        return
    old = [p for p in (out / "checkpoints").glob("step-*")] if (out / "checkpoints").is_dir() else []
    final = out / "final"
    if not old and not final.exists():
        return
    if not overwrite:
        what = f"{len(old)} checkpoints" + (" and final/" if final.exists() else "")
        raise InputError(fmt(f"output_dir {out}", f"another run's {what}",
                             "--resume to continue that run, --overwrite to replace it, or another --output-dir"))
    if main:
        for p in [out / "checkpoints", final]:
            if p.exists():
                shutil.rmtree(p)
        (out / "metrics.jsonl").unlink(missing_ok=True)


def load_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.pt``; a truncated or corrupt file is an ArtifactError naming it."""
    path = checkpoint / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... on a bad file
        raise ArtifactError(fmt(str(path), f"unreadable ({type(exc).__name__}: {str(exc)[:120]})",
                                f"a complete checkpoint; move {checkpoint.name} aside to resume from the one before, "
                                "or start again with --overwrite")) from None
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise ArtifactError(fmt(str(path), "not a trainer state", "a checkpoint written by nvembed train"))
    return state


def check_finite_step(step: int, loss: float, grad_norm: float, last: Path | None) -> None:
    """Stop a diverged run before the optimiser applies its step (and before any checkpoint of it)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written"
    raise TrainingDiverged(fmt(f"training step {step}", f"loss {loss}, gradient norm {grad_norm}",
                               f"lower lr, check the data and start weights; {kept} (weights unchanged)"))


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])



__all__ = ["CONFIG_FILE", "RUN_FILE", "STATE_FILE", "check_finite_step", "checkpoint_dirs", "load_state",
           "prepare_output_dir", "rng_states", "run_id_of", "set_rng_states", "write_model_dir"]
