"""Staged exports: real export processes SIGKILLed at each phase never leave a bundle that loads
as valid, a killed re-export leaves the previous bundle unchanged, a target holding other files
is refused untouched, and of two concurrent exports to one target exactly one succeeds."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import SAMPLE_TEXTS

pytest.importorskip("onnx", reason="needs the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install -e '.[onnx]'")

from nvembed_sdk import ArtifactError, Embedder  # noqa: E402
from nvembed_sdk.cli import main  # noqa: E402
from nvembed_sdk.exporters import staging  # noqa: E402
from nvembed_sdk.exporters.onnx_export import export_onnx  # noqa: E402

DRIVER = Path(__file__).with_name("export_kill_driver.py")


@pytest.fixture(scope="module")
def previous(tiny_checkpoint, tmp_path_factory) -> Path:
    """A finished bundle of the tiny model: copied to be the 'previous bundle' of a re-export."""
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("prev") / "onnx", validate=False)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _start(phase: str, checkpoint: Path, output: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-P", str(DRIVER), phase, "export", "--model", str(checkpoint), "--to", "onnx",
           "--output", str(output), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_at(phase: str, checkpoint: Path, output: Path, *extra: str) -> None:
    """Run a real export process until it reaches ``phase``, then SIGKILL it."""
    proc = _start(phase, checkpoint, output, *extra)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once the process stops itself (or exits)
    if not os.WIFSTOPPED(status):
        out = proc.stdout.read() if proc.stdout else ""
        pytest.fail(f"export exited before phase {phase!r}: {out}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _not_a_valid_bundle(path: Path) -> None:
    if path.exists():
        with pytest.raises(ArtifactError):
            Embedder.load(path)


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---- kills (real processes, real SIGKILL) ---------------------------------------------------------

FRESH_PHASES = ["model-written", "validating", "validated"]
REEXPORT_PHASES = ["model-written", "validating", "validated", "exchanged", "aside"]
# Each phase is one more export process (10-40 s on a busy 2-core box). By default a re-export is
# killed on both sides of the manifest write (model-written, validating) and of the final swap
# (validated, exchanged); the fallback two-rename path and the other fresh phases run with -m slow.
FAST_FRESH, FAST_REEXPORT = {"validating", "validated"}, {"model-written", "validating", "validated", "exchanged"}


def _tiered(phases: list[str], fast: set[str]) -> list:
    return [p if p in fast else pytest.param(p, marks=pytest.mark.slow) for p in phases]


@pytest.mark.parametrize("phase", _tiered(FRESH_PHASES, FAST_FRESH))
def test_killed_fresh_export_never_loads(phase, tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    _kill_at(phase, tiny_checkpoint, out, *([] if phase == "validating" else ["--no-validate"]))
    _not_a_valid_bundle(out)
    assert not out.exists()  # nothing appears at the target before the final rename
    # The next export to the target cleans the killed one's staging directory and succeeds.
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--to", "onnx", "--output", str(out),
                                    "--no-validate"])
    assert res.exit_code == 0, res.output
    assert Embedder.load(out, verify=True).embed("x").shape == (64,)
    assert _leftovers(tmp_path, "bundle") == []


@pytest.mark.parametrize("phase", _tiered(REEXPORT_PHASES, FAST_REEXPORT))
def test_killed_reexport_keeps_the_previous_bundle(phase, previous, other_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(previous, out)
    before = _snapshot(out)
    old_vectors = Embedder.load(out).embed(SAMPLE_TEXTS)
    _kill_at(phase, other_checkpoint, out, "--overwrite", *([] if phase == "validating" else ["--no-validate"]))
    if phase == "aside":
        # Without an atomic exchange the kill fell between the two renames: the previous bundle is
        # set aside whole, and the next export to the target (under its lock) puts it back.
        assert not out.exists() and len(_leftovers(tmp_path, "bundle")) >= 1
        staging._recover(out)
    if phase == "exchanged":
        # The swap is atomic: the target is the new complete bundle (the old one awaits deletion).
        new = Embedder.load(out, verify=True).embed(SAMPLE_TEXTS)
        assert float((new * old_vectors).sum(1).min()) < 0.9
    else:
        assert _snapshot(out) == before
        assert np.array_equal(Embedder.load(out, verify=True).embed(SAMPLE_TEXTS), old_vectors)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["bundle"]


@pytest.mark.slow
def test_kills_at_random_times_never_leave_a_broken_bundle(previous, other_checkpoint, tmp_path):
    """Kill an overwriting export after 1..9 s: the target is always the old or the new bundle, whole."""
    import time

    out = tmp_path / "bundle"
    shutil.copytree(previous, out)
    before = _snapshot(out)
    for delay in (1.0, 3.0, 5.0, 7.0, 9.0):
        proc = _start("none", other_checkpoint, out, "--overwrite", "--no-validate")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        Embedder.load(out, verify=True)  # old or new, complete
        if _snapshot(out) != before:
            break  # the new bundle made it in: later kills would be re-exports of it


# ---- targets that must not be replaced --------------------------------------------------------------


def test_directory_with_other_files_is_refused_untouched(tiny_checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"my model")
    (out / "model.onnx.data").write_bytes(b"my weights")
    (out / "tokenizer.json").write_text("{}")
    before = _snapshot(out)
    for extra in ([], ["--overwrite"]):
        res = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--to", "onnx",
                                        "--output", str(out), "--no-validate", *extra])
        assert res.exit_code == 1 and "not an nvembed bundle" in res.output and "Traceback" not in res.output
        assert _snapshot(out) == before
    file_target = tmp_path / "a-file"
    file_target.write_text("keep me")
    with pytest.raises(ArtifactError, match="not a directory"):
        export_onnx(tiny_checkpoint, file_target, validate=False)
    assert file_target.read_text() == "keep me"
    assert _leftovers(tmp_path, "mine") == []


def test_existing_bundle_needs_overwrite(previous, other_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(previous, out)
    before = _snapshot(out)
    with pytest.raises(ArtifactError, match="already holds a bundle.*--overwrite"):
        export_onnx(other_checkpoint, out, validate=False)
    assert _snapshot(out) == before
    (out / "notes.txt").write_text("mine")  # a bundle that also holds the user's file: not replaced
    with pytest.raises(ArtifactError, match="also holds notes.txt"):
        export_onnx(other_checkpoint, out, validate=False, overwrite=True)
    (out / "notes.txt").unlink()
    assert export_onnx(other_checkpoint, out, validate=False, overwrite=True) == out
    assert _snapshot(out) != before
    Embedder.load(out, verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging, lock or old copy left


def test_failed_validation_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import nvembed_sdk.exporters.validate as validate
    from nvembed_sdk import ToleranceExceeded
    from nvembed_sdk.parity import Tolerance

    # A budget no export can meet (Tolerance refuses it since the budget is range-checked, so it is
    # built without its check): every validation fails.
    impossible = object.__new__(Tolerance)
    object.__setattr__(impossible, "min_cosine", 1.0 + 1e-9)
    object.__setattr__(impossible, "min_topk", 1.0)
    monkeypatch.setattr(validate, "tolerance_for", lambda precision: impossible)
    with pytest.raises(ToleranceExceeded) as err:
        export_onnx(tiny_checkpoint, tmp_path / "strict", texts=SAMPLE_TEXTS * 2)
    assert err.value.report.candidate.startswith(f"{tmp_path / 'strict'} [")  # the target, not the staging dir
    assert list(tmp_path.iterdir()) == []


def test_concurrent_exports_exactly_one_succeeds(tiny_checkpoint, other_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    first = _start("validated", tiny_checkpoint, out, "--no-validate")  # stops holding the lock
    _, status = os.waitpid(first.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    second = _start("none", other_checkpoint, out, "--no-validate", "--overwrite")
    out2, _ = second.communicate(timeout=300)
    assert second.returncode == 1 and "another export is writing it" in out2, out2
    os.kill(first.pid, signal.SIGCONT)
    out1, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out1
    ref = Embedder.load(tiny_checkpoint, device="cpu").embed(SAMPLE_TEXTS)
    assert float((Embedder.load(out, verify=True).embed(SAMPLE_TEXTS) * ref).sum(1).min()) > 0.9999
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_lock_is_exclusive_in_process(tmp_path):
    target = tmp_path / "t"
    with staging._lock(target):
        held = staging._lock(target)
        with pytest.raises(ArtifactError, match="another export is writing it"):
            held.__enter__()
    with staging._lock(target):  # released (and the lock file removed) on exit
        pass
    assert list(tmp_path.iterdir()) == []


def test_quantized_export_is_staged(tiny_checkpoint, tmp_path):
    pytest.importorskip("modelopt", reason="needs the quant extra")
    from nvembed_sdk.exporters.quantize import export_quantized

    out = tmp_path / "int8"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an nvembed bundle"):
        export_quantized(tiny_checkpoint, out, precision="int8", calibration_size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"] and (out / "keep.txt").read_text() == "mine"


def test_tensorrt_cli_stages_onnx_and_engine_together(tiny_checkpoint, tmp_path, monkeypatch):
    """The CLI's checkpoint -> ONNX -> engine path moves onnx/ and engine.plan in together.

    TensorRT cannot run here: a stand-in replaces only the builder (it writes an engine bundle the
    way build_engine does: plan, tokenizer, manifest last, through the same staging decorator).
    """
    from types import SimpleNamespace

    import nvembed_sdk.exporters.trt_build as trt_build
    from nvembed_sdk.bundle_files import verify_files
    from nvembed_sdk.exporters.staging import staged
    from nvembed_sdk.manifest import read_manifest, write_manifest

    calls = []

    @staged("output_dir", inputs=("onnx_path",))
    def fake_build(onnx_path, output_dir, fail=False, **kw):
        calls.append((Path(onnx_path), Path(output_dir)))
        out = Path(output_dir)
        (out / "engine.plan").write_bytes(b"engine bytes")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(Path(onnx_path) / name, out / name)
        if fail:
            raise ArtifactError("stand-in builder | got a failure. Note: test")
        write_manifest(out, {"kind": "tensorrt", "precision": "fp16", "files": {"model": "engine.plan"},
                             "model": read_manifest(onnx_path)["model"], "text": {"max_length": 64}})
        return out

    target = SimpleNamespace(opset_for=lambda precision: 20)
    monkeypatch.setattr(trt_build, "preflight", lambda *a, **k: SimpleNamespace(target=target, trt_major=10))
    monkeypatch.setattr(trt_build, "build_engine", fake_build)
    out = tmp_path / "trt"
    args = ["export", "--model", str(tiny_checkpoint), "--to", "tensorrt", "--precision", "fp16",
            "--output", str(out), "--no-validate"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    (onnx_dir, stage), = calls
    assert stage.name.startswith(".trt.staging-") and onnx_dir == stage / "onnx"  # built inside the staging dir
    assert sorted(p.name for p in out.iterdir()) == ["engine.plan", "nvembed.json", "onnx", "special_tokens_map.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    verify_files(out, read_manifest(out), full=True)
    verify_files(out / "onnx", read_manifest(out / "onnx"), full=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trt"]
    # A builder failure after the ONNX step leaves the previous bundle as it was.
    before = _snapshot(out)
    monkeypatch.setattr(trt_build, "build_engine", functools.partial(fake_build, fail=True))
    res = CliRunner().invoke(main, [*args, "--overwrite"])
    assert res.exit_code == 1 and "stand-in builder" in res.output
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["trt"]
