"""The wheel's only top-level import name is nvembed_sdk (exporters/ and runtimes/ are mapped)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_top_level_is_only_nvembed_sdk(tmp_path):
    pytest.importorskip("setuptools")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), "-q"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next(tmp_path.glob("nvembed_sdk-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"nvembed_sdk"}, top
    assert "nvembed_sdk/runtimes/pt.py" in names and "nvembed_sdk/exporters/__init__.py" in names
    assert not any(n.startswith(("tests/", "models/", "examples/")) for n in names)
