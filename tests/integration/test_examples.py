"""The runnable examples run (CI gate exit codes, quickstart on any artifact)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("onnxruntime", reason="needs the onnx extra")


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    from nvembed_sdk.exporters.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("ex"), validate=False)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", *args], capture_output=True, text=True, cwd=ROOT)


def test_ci_gate_passes_and_fails(tiny_checkpoint, bundle, tmp_path):
    res = _run("examples/ci_parity_gate.py", "--reference", str(tiny_checkpoint), "--candidate", str(bundle),
               "--report", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((tmp_path / "r.json").read_text())["passed"]
    res = _run("examples/ci_parity_gate.py", "--reference", str(tiny_checkpoint), "--candidate", str(bundle),
               "--min-cosine", "1.0")
    assert res.returncode == 1 and "FAIL" in res.stdout


def test_quickstart_runs_on_any_artifact(bundle):
    res = _run("examples/quickstart_embed.py", "--model", str(bundle), "-k", "1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("query:") == 3
