"""Issue 13, training: a diverged run stops naming the step and keeps the last good checkpoint;
a new run never overwrites or prunes another run; bad settings and truncated states are one
clear error."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from nvembed_sdk.errors import ArtifactError, InputError, TrainingDiverged
from nvembed_sdk.train.config import TrainConfig
from nvembed_sdk.train.data import write_jsonl
from nvembed_sdk.train.loop import RUN_FILE, STATE_FILE, checkpoint_dirs, run_id_of, train

WORDS = ["audio", "video", "image", "font", "mail", "shell", "editor", "python", "perl", "rust", "kernel", "network"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    rng = random.Random(1)
    recs = []
    for i in range(64):
        a, b = rng.sample(WORDS, 2)
        recs.append({"query": f"{a} {b} tools", "positive": f"This package provides {a} and {b} support.",
                     "group": f"g{i // 4}"})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_jsonl(path, recs)
    return path


def _cfg(out: Path, data: Path, tokenizer: Path, **over) -> TrainConfig:
    base = {"output_dir": str(out), "init": "scratch", "tokenizer": str(tokenizer), "model": {"preset": "tiny-test"},
            "data": [{"path": str(data)}], "num_negatives": 0, "batch_size": 8, "lr": 3e-3, "warmup_steps": 0,
            "max_steps": 3, "log_every_steps": 1, "checkpoint_every_steps": 1, "query_max_length": 16,
            "doc_max_length": 24, "num_threads": 1, "keep_checkpoints": 5}
    return TrainConfig.from_dict({**base, **over})


def _finite(directory: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(directory / "model.safetensors")).values())


def test_huge_lr_stops_at_the_first_non_finite_step_keeping_the_last_good_checkpoint(tmp_path, pairs,
                                                                                    tiny_tokenizer_dir):
    cfg = _cfg(tmp_path / "run", pairs, tiny_tokenizer_dir, lr=1e6, max_steps=30, grad_clip=0.0)
    logs: list[str] = []
    with pytest.raises(TrainingDiverged, match=r"training step (\d+) \| got loss nan") as err:
        train(cfg, log=logs.append)
    ckpts = checkpoint_dirs(tmp_path / "run")
    assert "last good checkpoint" in str(err.value) or "no checkpoint" in str(err.value)
    assert all(_finite(c) for c in ckpts)  # nothing non-finite was ever saved
    assert not (tmp_path / "run" / "final").exists() and not any(line.startswith("done") for line in logs)


def test_resume_from_a_nan_checkpoint_stops_at_its_first_step(tmp_path, pairs, tiny_tokenizer_dir):
    out = tmp_path / "run"
    train(_cfg(out, pairs, tiny_tokenizer_dir), stop_after_steps=2, log=lambda s: None)
    last = checkpoint_dirs(out)[-1]
    tensors = load_file(str(last / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("norm.weight"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(last / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TrainingDiverged, match="training step 3 "):
        train(_cfg(out, pairs, tiny_tokenizer_dir), resume=True, log=lambda s: None)


def test_train_cli_reports_divergence_in_one_line(tmp_path, pairs, tiny_tokenizer_dir):
    from nvembed_sdk.cli import main

    cfg = _cfg(tmp_path / "run", pairs, tiny_tokenizer_dir, lr=1e6, max_steps=30, grad_clip=0.0)
    path = tmp_path / "stage.json"
    path.write_text(cfg.to_json())
    res = CliRunner().invoke(main, ["train", str(path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].startswith("error: training step ")


def test_a_new_run_refuses_another_runs_directory(tmp_path, pairs, tiny_tokenizer_dir):
    out = tmp_path / "run"
    first = train(_cfg(out, pairs, tiny_tokenizer_dir, max_steps=2), log=lambda s: None)
    assert first["final_dir"]
    with pytest.raises(InputError, match="another run's .*--resume .*--overwrite"):
        train(_cfg(out, pairs, tiny_tokenizer_dir, max_steps=2), log=lambda s: None)
    old_id = run_id_of(checkpoint_dirs(out)[-1])
    with pytest.raises(InputError, match="--resume and --overwrite"):
        train(_cfg(out, pairs, tiny_tokenizer_dir), resume=True, overwrite=True, log=lambda s: None)
    again = train(_cfg(out, pairs, tiny_tokenizer_dir, max_steps=2), overwrite=True, log=lambda s: None)
    assert again["step"] == 2 and run_id_of(checkpoint_dirs(out)[-1]) not in (None, old_id)


def test_pruning_only_touches_the_current_runs_checkpoints(tmp_path, pairs, tiny_tokenizer_dir):
    out = tmp_path / "run"
    train(_cfg(out, pairs, tiny_tokenizer_dir, keep_checkpoints=1), stop_after_steps=1, log=lambda s: None)
    ours = checkpoint_dirs(out)[-1]
    # A checkpoint of some other run (e.g. copied in by hand), older by step number.
    foreign = out / "checkpoints" / "step-000000"
    shutil.copytree(ours, foreign)
    (foreign / RUN_FILE).write_text(json.dumps({"run_id": "someone-else"}))
    train(_cfg(out, pairs, tiny_tokenizer_dir, keep_checkpoints=1), resume=True, log=lambda s: None)
    names = [p.name for p in checkpoint_dirs(out)]
    assert "step-000000" in names and names[-1] == "step-000003" and "step-000001" not in names


def test_truncated_trainer_state_is_named(tmp_path, pairs, tiny_tokenizer_dir):
    out = tmp_path / "run"
    train(_cfg(out, pairs, tiny_tokenizer_dir), stop_after_steps=1, log=lambda s: None)
    state = checkpoint_dirs(out)[-1] / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=f"{STATE_FILE} \\| got unreadable"):
        train(_cfg(out, pairs, tiny_tokenizer_dir), resume=True, log=lambda s: None)


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("lr", "abc", "train config lr | got 'abc'"),
    ("lr", -1e-3, "train config lr | got -0.001"),
    ("checkpoint_every_steps", 0, "train config checkpoint_every_steps | got 0"),
    ("batch_size", 8.5, "train config batch_size | got 8.5"),
    ("lora", [1], "train config lora | got [1]"),
    ("betas", [0.9], "train config betas"),
])
def test_bad_train_settings_name_the_field(key, value, needle):
    base = {"output_dir": "o", "tokenizer": "t", "data": ["x.jsonl"]}
    with pytest.raises(InputError) as err:
        TrainConfig.from_dict({**base, key: value})
    assert needle in str(err.value)
    assert TrainConfig.from_dict({**base, "lr": 1e6}).lr == 1e6  # allowed: the non-finite guard stops it


@pytest.mark.parametrize("size", ["1200k", "2500k"])  # full during the first checkpoint / a later one
def test_full_disk_during_a_checkpoint_is_one_error_and_leaves_no_partial_checkpoint(tmp_path, pairs,
                                                                                       tiny_tokenizer_dir, small_fs,
                                                                                       size):
    import errno

    from nvembed_sdk.errors import OutputError
    from nvembed_sdk.train.loop import load_state

    out = small_fs(size) / "run"
    with pytest.raises(OutputError, match=r"writing checkpoint .*step-\d+ \| got .*\(ENOSPC\)") as info:
        train(_cfg(out, pairs, tiny_tokenizer_dir, max_steps=4), log=lambda s: None)
    assert info.value.errno == errno.ENOSPC
    ckpts = out / "checkpoints"
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".")] == []  # no half-written temp dir
    for c in checkpoint_dirs(out):  # what is there is whole: a later --resume starts from it
        assert load_state(c)["step"] == int(c.name.split("-")[1]) and _finite(c)


@pytest.mark.parametrize("content, needle", [(b"\xff\xfe{}", "not UTF-8"), (b"[1, 2]", "got a list"),
                                             (b'"lr"', "got a str")])
def test_unreadable_train_config_names_the_file(tmp_path, content, needle):
    path = tmp_path / "stage.json"
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match=needle) as info:
        TrainConfig.from_file(path)
    assert str(info.value).startswith(str(path))


def test_records_on_a_full_disk_name_the_file_and_leave_no_temp(small_fs):
    from nvembed_sdk.errors import OutputError

    out = small_fs("8k") / "mined.jsonl"
    recs = ({"query": f"q{i}", "positive": "p" * 100} for i in range(400))  # ~50 KB
    with pytest.raises(OutputError, match=rf"writing records {out} \| got .*ENOSPC"):  # was "file system"
        write_jsonl(out, recs)
    assert list(out.parent.iterdir()) == []  # no mined.jsonl.tmp


# ---- SIGKILL during a checkpoint (a real `nvembed train` process) -------------------------------

KILL_DRIVER = Path(__file__).with_name("train_kill_driver.py")


def _kill_during_checkpoint(phase: str, nth: int, config: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-P", str(KILL_DRIVER), phase, str(nth), "train", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once the process stops itself (or exits)
    if not os.WIFSTOPPED(status):
        pytest.fail(f"training exited before checkpoint {nth} ({phase}): {proc.stdout.read() if proc.stdout else ''}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _nvembed(*args: str) -> None:
    import subprocess
    import sys
    from pathlib import Path as P

    exe = P(sys.executable).with_name("nvembed")
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, pairs, tiny_tokenizer_dir) -> dict[str, torch.Tensor]:
    """The final weights of a 5-step `nvembed train` run that nothing interrupted."""
    root = tmp_path_factory.mktemp("whole")
    config = root / "stage.json"
    config.write_text(_cfg(root / "run", pairs, tiny_tokenizer_dir, max_steps=5, keep_checkpoints=2).to_json())
    _nvembed("train", str(config))
    return load_file(str(root / "run" / "final" / "model.safetensors"))


@pytest.mark.parametrize("phase", ["state", "renamed"])
def test_sigkill_during_a_checkpoint_resumes_to_the_same_weights(phase, uninterrupted, tmp_path, pairs,
                                                                 tiny_tokenizer_dir):
    """SIGKILL a real `nvembed train` inside its 3rd checkpoint write, then `--resume`: the run ends
    with bit-identical weights to the uninterrupted one."""
    config = tmp_path / "stage.json"
    config.write_text(_cfg(tmp_path / "run", pairs, tiny_tokenizer_dir, max_steps=5, keep_checkpoints=2).to_json())
    _kill_during_checkpoint(phase, 3, config)
    done = [c.name for c in checkpoint_dirs(tmp_path / "run")]
    # state: step 3 was never renamed into place; renamed: it was, before the oldest was pruned.
    assert done == (["step-000001", "step-000002"] if phase == "state" else
                    ["step-000001", "step-000002", "step-000003"]), done
    _nvembed("train", str(config), "--resume")
    resumed = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k  # bit-exact, not merely close
    assert [c.name for c in checkpoint_dirs(tmp_path / "run")] == ["step-000004", "step-000005"]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")] == []
