"""The precision plan (exporters/plan.py) and the export pipeline's refusals before any work."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from nvembed_sdk.errors import InputError
from nvembed_sdk.exporters import pipeline
from nvembed_sdk.exporters.plan import GRAPHS, make_plan
from nvembed_sdk.exporters.targets import get_target
from nvembed_sdk.exporters.trt_build import BuildEnv


@pytest.mark.parametrize("to,precision,runtime,base,opset,graph_runtime", [
    ("onnx", "fp32", None, "fp32", 20, "any"),
    ("onnx", "fp16", None, "fp16", 20, "any"),
    ("onnx", "int8", None, "fp32", 20, "onnxruntime"),   # ONNX Runtime CPU integer kernels
    ("onnx", "int8", "tensorrt", "fp16", 20, "tensorrt"),
    ("onnx", "fp8", None, "fp16", 21, "tensorrt"),      # fp8's default runtime
    ("tensorrt", "int8", None, "fp16", 20, "tensorrt"),
    ("tensorrt", "fp8", None, "fp16", 21, "tensorrt"),
    ("tensorrt", "bf16", None, "fp32", 20, "tensorrt"),  # fp32 ONNX + BF16 flag (10.x)
])
def test_plan_table(to, precision, runtime, base, opset, graph_runtime):
    p = make_plan(to, precision, runtime=runtime)
    assert (p.base_dtype, p.opset, p.runtime) == (base, opset, graph_runtime)
    assert bool(p.qdq) == (precision in ("int8", "fp8"))
    # fp32 islands are listed exactly for the fp16-base quantised graphs
    assert bool(p.fp32_islands) == (base == "fp16" and precision in ("int8", "fp8"))


def test_plan_builder_settings_per_trt_major():
    assert make_plan("tensorrt", "int8", trt_major=10).strongly_typed is True
    assert make_plan("tensorrt", "int8", trt_major=10, strongly_typed=False).builder_flags == ("INT8", "FP16")
    assert make_plan("tensorrt", "bf16", trt_major=10).builder_flags == ("BF16",)
    p11 = make_plan("tensorrt", "fp8", trt_major=11)
    assert p11.strongly_typed is True and p11.builder_flags == ()


@pytest.mark.parametrize("kwargs,match,names", [
    (dict(to="tensorrt", precision="bf16", trt_major=11), "TensorRT 11", "fp16"),
    (dict(to="tensorrt", precision="int8", trt_major=11, strongly_typed=False), "always strongly typed", "drop"),
    (dict(to="tensorrt", precision="fp8", target="jetson-orin"), "no FP8", "int8"),
    (dict(to="onnx", precision="fp8", runtime="onnxruntime"), "no FP8 kernels", "--runtime tensorrt"),
    (dict(to="onnx", precision="bf16"), "bf16", "--to tensorrt"),
    (dict(to="tensorrt", precision="int8", runtime="onnxruntime"), "always runs on TensorRT", "--to onnx"),
    (dict(to="onnx", precision="int8", strongly_typed=True), "TensorRT build setting", "--to tensorrt"),
    (dict(to="onnx", precision="fp8", opset=20), "--opset", ">= 21"),
    (dict(to="tensorrt", precision="int8", source={"precision": "int8", "plan": {"runtime": "onnxruntime"}}),
     "onnxruntime", "--runtime tensorrt"),
])
def test_impossible_combinations_name_what_works(kwargs, match, names):
    with pytest.raises(InputError, match=match) as err:
        make_plan(**kwargs)
    msg = str(err.value)
    assert "\n" not in msg and names in msg and " | got " in msg and "Note:" in msg


def test_every_graph_row_is_reachable():
    for (precision, runtime) in GRAPHS:
        assert make_plan("onnx", precision, runtime=runtime).precision == precision


def test_trt11_refusals_happen_before_any_export_work(tmp_path, monkeypatch):
    """bf16 / --weakly-typed on TensorRT 11 are refused after preflight, before the ONNX export."""
    env = BuildEnv(trt=None, target=get_target("datacenter"), device_index=0,
                   facts={"version": "11.4.0", "gpu_name": "H100", "compute_capability": "9.0", "platform": "x86_64"})
    monkeypatch.setattr("nvembed_sdk.exporters.trt_build.preflight", lambda *a, **k: env)

    def no_work(*a, **k):
        raise AssertionError("export work started")

    monkeypatch.setattr(pipeline, "write_onnx_bundle", no_work)
    monkeypatch.setattr(pipeline, "write_engine_bundle", no_work)
    for kwargs, match in ((dict(precision="bf16"), "TensorRT 11"),
                          (dict(precision="int8", strongly_typed=False), "always strongly typed")):
        with pytest.raises(InputError, match=match):
            pipeline.export(tmp_path / "no-such-checkpoint", tmp_path / "out", to="tensorrt", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("to,precision,runtime", [("onnx", "int8", None), ("onnx", "int8", "tensorrt"),
                                                   ("tensorrt", "int8", None)])
def test_fp8_attention_refused_before_any_work(to, precision, runtime, tmp_path):
    """--fp8-attention on anything but an fp8 graph for TensorRT: refused with the other plan checks."""
    with pytest.raises(InputError, match=r"--fp8-attention .*--precision fp8"):
        pipeline.check_export(to, precision, tmp_path / "missing", runtime=runtime, fp8_attention=True)
    assert pipeline.check_export("tensorrt", "fp8", tmp_path / "missing", fp8_attention=True).precision == "fp8"
    assert pipeline.check_export("onnx", "fp8", tmp_path / "missing", fp8_attention=True).runtime == "tensorrt"


def test_cli_refuses_before_loading_anything(tmp_path):
    """The CLI refuses at once: the checkpoint path does not even exist and nothing is written."""
    exe = Path(sys.executable).parent / "nvembed-export"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-P", "-c",
                                             "from nvembed_sdk.cli import export_main; export_main()"]
    cases = [
        (["--to", "onnx", "--precision", "fp8", "--runtime", "onnxruntime"], "no FP8 kernels"),
        (["--to", "tensorrt", "--precision", "fp8", "--target", "jetson-orin"], "no FP8"),
        (["--to", "onnx", "--precision", "fp16", "--calibration-size", "64"], "calibration is for int8/fp8"),
        (["--to", "onnx", "--precision", "int8", "--weakly-typed"], "TensorRT build setting"),
        (["--to", "onnx", "--precision", "int8", "--runtime", "tensorrt", "--fp8-attention"], "--fp8-attention"),
    ]
    for args, match in cases:
        t0, cpu0 = time.perf_counter(), _children_cpu_s()
        res = subprocess.run([*cmd, "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "out"), *args],
                             capture_output=True, text=True, timeout=120)
        took, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0
        assert res.returncode != 0 and match in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        # "refused in under 10 s": the CPU the refusing process used (interpreter + imports, about 1.5 s
        # here) does not depend on what else loads the machine, as its wall-clock time does
        assert cpu < 10, f"{' '.join(args)}: {cpu:.1f} s of CPU to refuse"
        print(f"{' '.join(args)}: refused in {took:.2f} s ({cpu:.2f} s CPU)")  # wall-clock: a figure, not asserted
    assert not (tmp_path / "out").exists()


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # the waited-for subprocesses, user + system
    return r.ru_utime + r.ru_stime
