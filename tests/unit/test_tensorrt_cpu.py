"""TensorRT paths that must behave on a CPU-only machine without TensorRT.

Covers: targets and ``--profile`` parsing, the precision plan for TensorRT 10.x/11.x, the
fail-fast errors (no TensorRT, Orin FP8, low compute capability), the engine/machine mismatch
check and its rebuild command, the profile choice and batch splitting of the runtime, the CLI's
exit code and timing, and the build and run control flow against a fake ``tensorrt`` module
whose "engine" runs the tiny torch model (our logic only; TensorRT itself is tests/gpu's job).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nvembed_sdk.errors import ArtifactError, BackendUnavailableError, InputError
from nvembed_sdk.exporters.targets import (
    TARGETS,
    Profile,
    check_build_host,
    check_compute_capability,
    check_target,
    fit_profiles,
    parse_profile,
    parse_profiles,
)
from nvembed_sdk.exporters.trt_build import build_engine, plan_precision, preflight
from nvembed_sdk.manifest import write_manifest
from nvembed_sdk.runtimes.trt import Chunk, engine_mismatch, plan_batches, rebuild_command


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


no_trt = pytest.mark.skipif(_has_tensorrt(), reason="tensorrt is installed here: the no-TensorRT path is not reachable")


@pytest.fixture()
def onnx_bundle(tmp_path: Path, tiny_tokenizer_dir: Path) -> Path:
    """A structurally valid ONNX bundle (manifest + tokenizer); model.onnx is a placeholder."""
    d = tmp_path / "onnx"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"placeholder: never parsed on a machine without TensorRT")
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    write_manifest(d, {"kind": "onnx", "precision": "fp16", "opset": 20, "files": {"model": "model.onnx"},
                       "model": {"dim": 64}, "text": {"max_length": 512, "pad_id": 2}})
    return d


@pytest.fixture()
def engine_bundle(tmp_path: Path, tiny_tokenizer_dir: Path) -> Path:
    d = tmp_path / "engine"
    d.mkdir()
    (d / "engine.plan").write_bytes(b"not a real plan")
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    write_manifest(d, {
        "kind": "tensorrt", "precision": "fp16", "target": "datacenter", "files": {"model": "engine.plan"},
        "model": {"dim": 64}, "text": {"max_length": 512},
        "tensorrt": {"version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                     "platform": "x86_64", "profiles": [{"min": [1, 1], "opt": [32, 128], "max": [128, 128]}]},
        "source": {"onnx": "/data/bundles/onnx-fp16"},
    })
    return d


# ---- targets -------------------------------------------------------------------------------------


def test_orin_fp8_fails_naming_int8_and_fp16():
    with pytest.raises(InputError) as err:
        check_target("jetson-orin", "fp8")
    msg = str(err.value)
    assert "INT8" in msg and "FP16" in msg and "8.7" in msg
    assert "\n" not in msg and " | " in msg and "Note:" in msg


@pytest.mark.parametrize("target", ["datacenter", "jetson-thor"])
def test_fp8_allowed_on_datacenter_and_thor(target):
    t = check_target(target, "fp8")
    assert t.opset_for("fp8") >= 21 and t.opset_for("fp16") <= 20


def test_orin_defaults():
    t = check_target("jetson-orin", "int8")
    assert t.opset_for("int8") <= 20 and "fp8" not in t.precisions and t.on_device
    assert max(p.max_seq for p in t.profiles) <= 2048
    assert t.workspace_gb < TARGETS["datacenter"].workspace_gb


def test_unknown_target_and_precision():
    with pytest.raises(InputError, match="datacenter, jetson-orin, jetson-thor"):
        check_target("jetson-nano", "fp16")
    with pytest.raises(InputError, match="fp32, fp16, bf16, int8, fp8"):
        check_target("datacenter", "int4")


def test_compute_capability_gate():
    check_compute_capability("fp8", (8, 9), "NVIDIA L40S")
    check_compute_capability("fp8", (9, 0), "NVIDIA H100")
    check_compute_capability("int8", (7, 5), "Tesla T4")
    with pytest.raises(InputError, match=r"8\.9") as err:
        check_compute_capability("fp8", (8, 6), "NVIDIA A10")
    assert "A10" in str(err.value) and "8.6" in str(err.value)
    with pytest.raises(InputError, match="BF16"):
        check_compute_capability("bf16", (7, 5), "Tesla T4")


def test_jetson_targets_build_on_the_device():
    check_build_host(TARGETS["jetson-orin"], "aarch64")
    check_build_host(TARGETS["datacenter"], "aarch64")  # Grace Hopper is a datacenter aarch64 host
    with pytest.raises(InputError, match="on the Jetson|Jetson and run"):
        check_build_host(TARGETS["jetson-thor"], "x86_64")


# ---- profiles ------------------------------------------------------------------------------------


def test_parse_profile_full_and_shorthand():
    p = parse_profile("1x16:8x128:32x512")
    assert (p.min, p.opt, p.max) == ((1, 16), (8, 128), (32, 512))
    assert p.to_str() == "1x16:8x128:32x512"
    assert Profile.from_dict(p.to_dict()) == p
    assert parse_profile(" 32X512 ") == Profile((1, 1), (32, 512), (32, 512))


def test_parse_several_profiles_sorted_and_deduplicated():
    got = parse_profiles(["1x1:2x512:8x512", "1x1:8x128:32x128,1x1:8x128:32x128"])
    assert [p.to_str() for p in got] == ["1x1:8x128:32x128", "1x1:2x512:8x512"]
    assert parse_profiles(None) is None and parse_profiles([]) is None and parse_profiles("") is None


@pytest.mark.parametrize("bad", ["1x16:8x128", "16", "1x16:8x128:32", "0x16:8x128:32x512", "1x16:8x600:32x512",
                                 "4x16:2x128:32x512", "axb", "1x16;8x128;32x512"])
def test_parse_profile_rejects(bad):
    with pytest.raises(InputError, match="profile"):
        parse_profile(bad)


def test_fit_profiles_caps_to_max_length():
    dc = TARGETS["datacenter"].profiles
    assert [p.max_seq for p in fit_profiles(dc, 512)] == [128, 512]
    capped = fit_profiles(dc, 1000)
    assert [p.max_seq for p in capped] == [128, 512, 1000] and capped[-1].opt[1] == 1000
    assert [p.max_seq for p in fit_profiles(dc, 100)] == [100]


# ---- precision plan: TensorRT 10.x vs 11.x -------------------------------------------------------


@pytest.mark.parametrize("requested,onnx,major,typed,expected", [
    ("fp16", "fp16", 10, None, (True, ())),
    ("fp16", "fp32", 10, None, (False, ("FP16",))),           # trtexec --fp16 on JetPack 6
    ("bf16", "fp32", 10, None, (False, ("BF16",))),
    ("int8", "int8", 10, None, (True, ())),                    # Q/DQ: strongly typed
    ("int8", "int8", 10, False, (False, ("INT8", "FP16"))),   # trtexec --fp16 --int8
    ("fp8", "fp8", 10, None, (True, ())),
    ("fp16", "fp16", 10, False, (False, ("FP16",))),
    ("fp32", "fp32", 10, None, (True, ())),
    ("fp32", "fp32", 10, False, (False, ())),
    ("fp16", "fp16", 11, None, (True, ())),
    ("fp8", "fp8", 11, None, (True, ())),
])
def test_plan_precision(requested, onnx, major, typed, expected):
    assert plan_precision(requested, onnx, major, typed) == expected


@pytest.mark.parametrize("requested,onnx,major,typed,match", [
    ("int8", "fp16", 10, None, "Q/DQ"),
    ("fp8", "fp32", 11, None, "TensorRT 11"),
    ("fp16", "fp32", 11, None, "TensorRT 11"),
    ("fp16", "fp16", 11, False, "always strongly typed"),
    ("fp16", "fp32", 10, True, "strongly typed"),
    ("fp32", "fp16", 10, None, "fp32"),
])
def test_plan_precision_rejects(requested, onnx, major, typed, match):
    with pytest.raises(InputError, match=match) as err:
        plan_precision(requested, onnx, major, typed)
    if typed is not False:  # the fix is another bundle: the message gives the export command
        assert "nvembed-export" in str(err.value)


# ---- fail fast without TensorRT ------------------------------------------------------------------


@no_trt
def test_build_fails_fast_without_tensorrt(onnx_bundle, tmp_path):
    with pytest.raises(BackendUnavailableError) as err:
        build_engine(onnx_bundle, tmp_path / "out", precision="fp16")
    msg = str(err.value)
    assert msg.startswith("tensorrt | is not installed")
    assert "pip install -e '.[tensorrt]'" in msg and "JetPack" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()  # nothing written


@no_trt
def test_preflight_fails_fast_without_tensorrt():
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        preflight("int8", "datacenter")
    # ...but an impossible request is reported first, without touching TensorRT.
    with pytest.raises(InputError, match="INT8"):
        preflight("fp8", "jetson-orin")


def test_build_checks_inputs_before_tensorrt(onnx_bundle, tmp_path):
    with pytest.raises(InputError, match="INT8"):
        build_engine(onnx_bundle, tmp_path / "o", precision="fp8", target="jetson-orin")
    with pytest.raises(InputError, match="profile"):
        build_engine(onnx_bundle, tmp_path / "o", precision="fp16", profiles=["8x128:1x16:32x512"])
    with pytest.raises(InputError, match="other than the ONNX bundle"):
        build_engine(onnx_bundle, onnx_bundle, precision="fp16")
    with pytest.raises(ArtifactError, match="does not exist"):
        build_engine(tmp_path / "missing", tmp_path / "o", precision="fp16")
    with pytest.raises(InputError, match="opt_level"):
        build_engine(onnx_bundle, tmp_path / "o", precision="fp16", opt_level=7)


@no_trt
@pytest.mark.parametrize("as_file", [False, True])
def test_loading_engine_without_tensorrt(engine_bundle, as_file):
    from nvembed_sdk import Embedder

    path = engine_bundle / "engine.plan" if as_file else engine_bundle
    with pytest.raises(BackendUnavailableError, match=r"tensorrt \| is not installed.*\.\[tensorrt\]"):
        Embedder.load(path)


def test_backend_refuses_a_non_tensorrt_bundle(engine_bundle):
    from nvembed_sdk.runtimes.trt import TrtBackend

    m = json.loads((engine_bundle / "nvembed.json").read_text())
    m["kind"] = "onnx"
    (engine_bundle / "nvembed.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="kind 'onnx'"):
        TrtBackend(engine_bundle / "engine.plan").load()


# ---- engine vs machine -----------------------------------------------------------------------------


def test_engine_mismatch():
    built = {"version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "platform": "aarch64"}
    assert engine_mismatch(built, dict(built)) == []
    here = {"version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
            "platform": "x86_64"}
    problems = engine_mismatch(built, here)
    assert len(problems) == 3 and any("GPU" in p and "H100" in p for p in problems)
    assert engine_mismatch({**built, "version": "10.3.1"}, built) == ["TensorRT: built with '10.3.1', this machine has '10.3.0'"]
    assert engine_mismatch({"gpu_name": "Orin"}, built) == ["TensorRT: not recorded in the manifest",
                                                             "compute capability: not recorded in the manifest"]


def test_rebuild_command_reproduces_the_build(engine_bundle):
    m = json.loads((engine_bundle / "nvembed.json").read_text())
    cmd = rebuild_command(m, engine_bundle)
    assert cmd.startswith("nvembed-export --model /data/bundles/onnx-fp16 --to tensorrt --precision fp16 "
                          "--target datacenter --profile 1x1:32x128:128x128 --output ")


# ---- runtime: profile choice and splitting -----------------------------------------------------------

PROFILES = [((1, 1), (8, 128), (32, 128)), ((1, 1), (2, 512), (8, 512))]


def test_plan_picks_tightest_profile():
    assert plan_batches(PROFILES, 4, 100) == [Chunk(0, 0, 4, 4, 100)]
    assert plan_batches(PROFILES, 4, 129) == [Chunk(1, 0, 4, 4, 129)]


def test_plan_splits_batches_over_max_batch():
    chunks = plan_batches(PROFILES, 70, 64)
    assert [(c.lo, c.hi) for c in chunks] == [(0, 32), (32, 64), (64, 70)] and {c.profile for c in chunks} == {0}
    long = plan_batches(PROFILES, 10, 300)
    assert [(c.profile, c.lo, c.hi) for c in long] == [(1, 0, 8), (1, 8, 10)]


def test_plan_pads_below_profile_minimum():
    assert plan_batches([((4, 16), (8, 128), (32, 512))], 2, 5) == [Chunk(0, 0, 2, 4, 16)]


def test_plan_too_long_names_max_length():
    with pytest.raises(InputError, match=r"max_length <= 512"):
        plan_batches(PROFILES, 1, 600)


def test_pad_rows_and_columns():
    import numpy as np

    from nvembed_sdk.runtimes.trt import _pad

    a = np.array([[5, 6, 7], [8, 9, 0]], dtype=np.int64)
    got = _pad(a, 3, 5, fill=2)
    assert got.tolist() == [[5, 6, 7, 2, 2], [8, 9, 0, 2, 2], [5, 6, 7, 2, 2]]


# ---- CLI (once the export command is registered) -----------------------------------------------------


def _export_cli() -> list[str]:
    from nvembed_sdk.cli import COMMANDS

    if "export" not in COMMANDS:
        pytest.skip("nvembed-export has no export command registered yet (nvembed_sdk.cli_export)")
    exe = Path(sys.executable).parent / "nvembed-export"
    return [str(exe)] if exe.is_file() else [sys.executable, "-P", "-c", "from nvembed_sdk.cli import export_main; export_main()"]


def _run_cli(args: list[str]) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(_export_cli() + args, capture_output=True, text=True, env=env, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


@no_trt
def test_cli_tensorrt_fails_fast(tiny_checkpoint, tmp_path):
    rc, out, seconds = _run_cli(["--model", str(tiny_checkpoint), "--to", "tensorrt", "--precision", "fp16",
                                 "--output", str(tmp_path / "out")])
    assert rc != 0, (rc, out)
    assert not (tmp_path / "out").exists()  # refused before any export work
    print(f"refused in {seconds:.2f} s")  # a figure for the report, not asserted (no timed tests)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and "tensorrt" in lines[0] and "pip install -e '.[tensorrt]'" in lines[0], out


def test_cli_orin_fp8_fails_naming_int8_and_fp16(tiny_checkpoint, tmp_path):
    rc, out, seconds = _run_cli(["--model", str(tiny_checkpoint), "--to", "tensorrt", "--precision", "fp8",
                                 "--target", "jetson-orin", "--output", str(tmp_path / "out")])
    assert rc != 0, (rc, out)
    assert not (tmp_path / "out").exists()  # refused before any export work
    print(f"refused in {seconds:.2f} s")
    assert "INT8" in out and "FP16" in out


# ---- a fake `tensorrt` that encodes the real 10.3, 10.x and 11.x API ------------------------------
# Its "engine" runs the tiny torch model on the bound buffers, so these tests check our own logic
# (profiles, flags, timing cache, manifest, batching, padding, buffer binding, output slicing, and
# every return value TensorRT reports failure with), not TensorRT's kernels: tests/gpu does that.
#
# Every value and return type is read from NVIDIA/TensorRT at tags v10.3.0 (JetPack 6), v10.16
# (the last 10.x) and v11.1:
# * include/NvInfer.h `NetworkDefinitionCreationFlag`: 10.x kEXPLICIT_BATCH = 0 (deprecated,
#   ignored), kSTRONGLY_TYPED = 1, 10.16 adds kPREFER_JIT_PYTHON_PLUGINS = 2 / kPREFER_AOT_ = 3;
#   11.x kSTRONGLY_TYPED = 0 ("deprecated ... always enabled ... ignored"), kPREFER_JIT_ = 1,
#   kPREFER_AOT_ = 2, no EXPLICIT_BATCH.
# * include/NvInfer.h `BuilderFlag` (the members python/src/infer/pyCore.cpp binds): 10.3 and
#   10.16 have FP16 0, INT8 1, FP8 15, BF16 17 (deprecated in 10.16); 11.1 has no precision flag
#   (and renumbers: VERSION_COMPATIBLE 13 -> 12).
# * include/NvInferRuntimeBase.h `DataType`: FLOAT 0, HALF 1, INT8 2, INT32 3, BOOL 4, UINT8 5,
#   FP8 6, BF16 7, INT64 8, INT4 9 (+ FP4 10, E8M0 11 from 10.16 on).
# * pyCore.cpp: `IBuilderConfig.set_timing_cache(cache, ignore_mismatch) -> bool` ("false" for a
#   cache whose CUDA device properties differ, NvInfer.h); `create_timing_cache(buffer)` returns the
#   ITimingCache pointer (None when TensorRT cannot create it); `get_timing_cache()` what is
#   attached; `add_optimization_profile(p) -> int` (index, or -1 for an invalid profile);
#   `IOptimizationProfile.set_shape` raises RuntimeError for inconsistent shapes;
#   `build_serialized_network -> IHostMemory | None`; `deserialize_cuda_engine -> ICudaEngine | None`;
#   `create_execution_context -> IExecutionContext | None`; `set_input_shape`, `set_tensor_address`,
#   `set_optimization_profile_async`, `execute_async_v3` all return bool.
# * python/src/parsers/pyOnnx.cpp: `OnnxParser.parse_from_file(path) -> bool`, the `num_errors`
#   property, `get_error(i) -> ParserError` with code(), desc(), file(), line(), func(), node(),
#   node_name(), node_operator(), local_function_stack() (list of str) and local_function_stack_size().

TRT_VERSIONS = ["10.3.0", "10.16.1", "11.1.0"]
_NET_FLAGS = {10: {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
              11: {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2}}
_BUILDER_FLAGS = {
    10: {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
         "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8, "OBEY_PRECISION_CONSTRAINTS": 9, "PREFER_PRECISION_CONSTRAINTS": 10,
         "DIRECT_IO": 11, "REJECT_EMPTY_ALGORITHMS": 12, "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14,
         "FP8": 15, "ERROR_ON_TIMING_CACHE_MISS": 16, "BF16": 17, "DISABLE_COMPILATION_CACHE": 18, "STRIP_PLAN": 19,
         "REFIT_IDENTICAL": 20, "WEIGHT_STREAMING": 21, "INT4": 22, "REFIT_INDIVIDUAL": 23},
    11: {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7,
         "SAFETY_SCOPE": 8, "DIRECT_IO": 11, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13,
         "ERROR_ON_TIMING_CACHE_MISS": 15, "DISABLE_COMPILATION_CACHE": 17, "STRIP_PLAN": 18, "REFIT_IDENTICAL": 19,
         "WEIGHT_STREAMING": 20, "REFIT_INDIVIDUAL": 22, "STRICT_NANS": 23, "MONITOR_MEMORY": 24,
         "EDITABLE_TIMING_CACHE": 26, "DISTRIBUTIVE_INDEPENDENCE": 27},
}
_DTYPES = {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "FP8": 6, "BF16": 7, "INT64": 8,
           "INT4": 9}
FAKE_GPU = "NVIDIA Fake GPU"
NAMES = ("input_ids", "attention_mask", "pool_mask", "embeddings")


def _fake_trt(version: str, model, calls: list, profiles: list, faults: set, parse_errors: list):
    """The fake module for TensorRT ``version``. ``faults`` names the calls that report failure."""
    import enum
    import importlib.machinery
    import types

    import torch

    major = int(version.split(".")[0])
    at_least_10_16 = tuple(int(x) for x in version.split(".")[:2]) >= (10, 16)  # as strings, "10.3" > "10.16"
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo calls find_spec on it
    trt.__version__ = version
    net_flags = dict(_NET_FLAGS[major])
    if at_least_10_16 and major == 10:
        net_flags.update(PREFER_JIT_PYTHON_PLUGINS=2, PREFER_AOT_PYTHON_PLUGINS=3)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", net_flags)
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", _BUILDER_FLAGS[major])
    trt.DataType = enum.IntEnum("DataType", {**_DTYPES, **({"FP4": 10, "E8M0": 11} if at_least_10_16 else {})})
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
    trt.Logger = type("Logger", (), {"VERBOSE": 4, "WARNING": 2, "__init__": lambda s, level=2: None})
    memory: dict[int, torch.Tensor] = {}  # data_ptr -> CPU buffer standing in for device memory

    class Net:
        num_inputs, num_outputs = 3, 1

        def __init__(self, flags: int):
            self.flags = flags

        def get_input(self, i):
            return types.SimpleNamespace(name=NAMES[i])

        def get_output(self, i):
            return types.SimpleNamespace(name="embeddings")

        def get_flag(self, flag):
            if major >= 11 and flag == trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED:
                return True  # always on, the flag is ignored
            return bool(self.flags & (1 << int(flag)))

    class TimingCache:  # serialised as b"TC:<gpu>:<entries>"
        def __init__(self, gpu: str, entries: int):
            self.gpu, self.entries = gpu, entries

        def serialize(self):
            return f"TC:{self.gpu}:{self.entries}".encode()

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache = set(), [], None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool.name, size))

        def set_flag(self, flag):
            assert isinstance(flag, trt.BuilderFlag)
            self.flags.add(flag.name)
            calls.append(("set_flag", flag.name))

        def add_optimization_profile(self, profile) -> int:
            if "profile" in faults:
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob):
            blob = bytes(blob)
            calls.append(("timing_cache_in", blob))
            if not blob:
                return TimingCache(FAKE_GPU, 0)
            parts = blob.split(b":")
            if len(parts) != 3 or parts[0] != b"TC":
                return None  # unreadable
            return TimingCache(parts[1].decode(), int(parts[2]))

        def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
            if cache.gpu != FAKE_GPU and not ignore_mismatch:
                return False  # "A failure will be reported if the CUDA device property ... is different"
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags: int):
            calls.append(("network_flags", flags))
            return Net(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            def set_shape(name, lo, opt, hi):
                if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
                    raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
                calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))
            return types.SimpleNamespace(set_shape=set_shape)

        def build_serialized_network(self, network, config):
            calls.append(("build", network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED),
                          sorted(config.flags), len(config.profiles)))
            if config.cache is not None:
                config.cache.entries += 1  # the builder adds its timings to the attached cache
            return b"PLAN-" + version.encode()

    class ParserError:
        def __init__(self, desc, node=-1, name="", op="", stack=()):
            self._d, self._n, self._name, self._op, self._stack = desc, node, name, op, list(stack)

        def code(self):
            return 8  # ErrorCode.UNSUPPORTED_NODE

        def desc(self):
            return self._d

        def file(self):
            return "ModelImporter.cpp"

        def line(self):
            return 1

        def func(self):
            return "parseNode"

        def node(self):
            return self._n

        def node_name(self):
            return self._name

        def node_operator(self):
            return self._op

        def local_function_stack(self):
            return list(self._stack)

        def local_function_stack_size(self):
            return len(self._stack)

    class Parser:
        def __init__(self, network, logger):
            self._errors = []

        def parse_from_file(self, path) -> bool:
            calls.append(("parse_from_file", path))
            self._errors = [ParserError(*e) for e in parse_errors]
            return not self._errors

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, i):
            return self._errors[i]

    class Context:
        def __init__(self):
            self.shapes, self.addr, self.profile = {}, {}, 0

        def set_optimization_profile_async(self, i, stream) -> bool:
            self.profile = i
            return True

        def set_input_shape(self, name, shape) -> bool:
            lo, _, hi = profiles[self.profile]
            if "shape" in faults:
                return False
            self.shapes[name] = tuple(shape)
            return all(a <= b <= c for a, b, c in zip(lo, shape, hi, strict=True))

        def set_tensor_address(self, name, ptr) -> bool:
            if "address" in faults or name not in NAMES:
                return False
            self.addr[name] = ptr
            return True

        def get_tensor_shape(self, name):
            return (self.shapes["input_ids"][0], model.cfg.dim)

        def execute_async_v3(self, stream) -> bool:
            b, t = self.shapes["input_ids"]
            x = [memory[self.addr[n]][: b * t].view(b, t) for n in NAMES[:3]]
            calls.append(("execute", self.profile, b, t))
            with torch.no_grad():
                memory[self.addr["embeddings"]][: b * model.cfg.dim].view(b, -1).copy_(model(*x, normalize=True))
            return True

    class Engine:
        num_io_tensors, num_optimization_profiles = 4, len(profiles)

        def get_tensor_name(self, i):
            return NAMES[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.OUTPUT if name == "embeddings" else trt.TensorIOMode.INPUT

        def get_tensor_dtype(self, name):  # an fp16 output is widened by the backend
            return trt.DataType.HALF if name == "embeddings" else trt.DataType.INT64

        def get_tensor_profile_shape(self, name, i):
            return profiles[i]

        def create_execution_context(self):
            return None if "context" in faults else Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine() if bytes(plan) == b"PLAN-" + version.encode() else None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt, memory


def _dist_info(root: Path, name: str, version: str) -> Path:
    """A pip-installed distribution's metadata (what importlib.metadata reads), without the package."""
    d = root / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


@pytest.fixture(params=TRT_VERSIONS)
def fake_gpu(request, monkeypatch, tiny_model, tmp_path):
    """A fake tensorrt module (10.3, 10.16 or 11.1) and CPU stand-ins for the CUDA calls.

    ``fake_gpu.faults`` / ``fake_gpu.parse_errors`` make the fake report failures; a fake
    ``tensorrt-cu12`` distribution tells which CUDA major the "installed" TensorRT is for.
    """
    import contextlib
    import types

    import torch

    from nvembed_sdk.exporters import trt_build
    from nvembed_sdk.runtimes import trt as rt

    version = request.param
    calls: list = []
    faults: set = set()
    parse_errors: list = []
    profiles = [((1, 1), (2, 16), (4, 16)), ((2, 1), (2, 64), (3, 64))]
    trt, memory = _fake_trt(version, tiny_model, calls, profiles, faults, parse_errors)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.syspath_prepend(str(_dist_info(tmp_path / "site-cu12", "tensorrt-cu12", version)))
    monkeypatch.setattr(rt, "_DPKG_STATUS", str(tmp_path / "no-dpkg"))
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(rt, "cuda_device_index", lambda device: 0)

    def facts(v, index):  # machine_facts without a GPU: the real CUDA-major detection, a fake GPU
        return {"version": str(v), "cuda_major": rt.tensorrt_cuda_major(), "gpu_name": FAKE_GPU,
                "compute_capability": "9.0", "platform": "x86_64"}

    monkeypatch.setattr(rt, "machine_facts", facts)
    monkeypatch.setattr(trt_build, "preflight", lambda precision, target="datacenter", device=None:
                        trt_build.BuildEnv(trt, check_target(target, precision), 0, facts(version, 0)))

    def cpu_buffer(self, name, numel):
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[name] = torch.zeros(numel, dtype=self._dtypes[name])
            memory[buf.data_ptr()] = buf
        return buf

    monkeypatch.setattr(rt.TrtBackend, "_buffer", cpu_buffer)
    return types.SimpleNamespace(calls=calls, faults=faults, parse_errors=parse_errors, version=version,
                                 major=int(version.split(".")[0]), tmp=tmp_path, monkeypatch=monkeypatch)


def _build(fake, onnx_bundle: Path, out: Path, **kw) -> Path:
    kw.setdefault("profiles", ["1x1:2x16:4x16", "2x1:2x64:3x64"])
    return build_engine(onnx_bundle, out, precision=kw.pop("precision", "fp16"), **kw)


def test_fake_encodes_the_real_enum_values():
    import types

    for version in TRT_VERSIONS:
        trt, _ = _fake_trt(version, None, [], [], set(), [])
        flag = int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if version.startswith("10."):
            assert flag == 1 and int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) == 0
            assert {"FP16", "BF16", "INT8", "FP8"} <= set(trt.BuilderFlag.__members__)
            later = version != "10.3.0"  # plugin flags and FP4/E8M0 came after 10.3 (JetPack 6); 10.16 has them
            assert hasattr(trt.NetworkDefinitionCreationFlag, "PREFER_JIT_PYTHON_PLUGINS") == later
            assert hasattr(trt.DataType, "FP4") == later
        else:
            assert flag == 0 and not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
            assert not {"FP16", "BF16", "INT8", "FP8"} & set(trt.BuilderFlag.__members__)
            assert int(trt.BuilderFlag.VERSION_COMPATIBLE) == 12
        assert isinstance(trt, types.ModuleType)


def test_build_flow_with_fake_tensorrt(fake_gpu, onnx_bundle, tmp_path):
    cache = tmp_path / "timing.cache"
    out = _build(fake_gpu, onnx_bundle, tmp_path / "engine", timing_cache=cache)
    calls = fake_gpu.calls
    # fp16 ONNX -> strongly typed: 1 << STRONGLY_TYPED (= 1 << 1) on 10.x; no flag on 11 (always on).
    assert ("network_flags", 2 if fake_gpu.major == 10 else 0) in calls
    assert ("build", True, [], 2) in calls  # strongly typed, no precision flags, both profiles
    assert ("parse_from_file", str(onnx_bundle / "model.onnx")) in calls
    assert ("set_memory_pool_limit", "WORKSPACE", 8 << 30) in calls
    assert [c for c in calls if c[0] == "set_shape"][:3] == [
        ("set_shape", n, (1, 1), (2, 16), (4, 16)) for n in ("input_ids", "attention_mask", "pool_mask")]
    assert ("timing_cache_in", b"") in calls and cache.read_bytes() == f"TC:{FAKE_GPU}:1".encode()
    assert (out / "engine.plan").read_bytes() == b"PLAN-" + fake_gpu.version.encode()
    assert (out / "tokenizer.json").is_file() and not list(out.glob(".*tmp"))
    m = json.loads((out / "nvembed.json").read_text())
    assert m["kind"] == "tensorrt" and m["files"] == {"model": "engine.plan"} and m["model"] == {"dim": 64}
    assert m["text"]["max_length"] == 64 and m["tensorrt"]["gpu_name"] == FAKE_GPU
    assert m["tensorrt"]["version"] == fake_gpu.version and m["tensorrt"]["cuda_major"] == "12"
    assert m["tensorrt"]["plan_bytes"] == (out / "engine.plan").stat().st_size
    assert m["tensorrt"]["profiles"][1] == {"min": [2, 1], "opt": [2, 64], "max": [3, 64]}
    assert m["source"]["onnx"] == str(onnx_bundle.resolve()) and len(m["source"]["onnx_sha256"]) == 64

    calls.clear()
    if fake_gpu.major >= 11:  # no weak typing and no FP16 builder flag in TensorRT 11
        with pytest.raises(InputError, match="always strongly typed"):
            _build(fake_gpu, onnx_bundle, tmp_path / "weak", timing_cache=cache, strongly_typed=False)
        return
    _build(fake_gpu, onnx_bundle, tmp_path / "weak", timing_cache=cache, strongly_typed=False)
    assert ("network_flags", 0) in calls and ("set_flag", "FP16") in calls and ("build", False, ["FP16"], 2) in calls
    assert ("timing_cache_in", f"TC:{FAKE_GPU}:1".encode()) in calls  # the cache file is reused...
    assert cache.read_bytes() == f"TC:{FAKE_GPU}:2".encode()  # ...and grows


@pytest.mark.parametrize("blob", [b"TC:NVIDIA Other GPU:7", b"\x00garbage"])  # another GPU's / unreadable
def test_rejected_timing_cache_builds_with_a_fresh_one(fake_gpu, onnx_bundle, tmp_path, caplog, blob):
    from nvembed_sdk.exporters.trt_build import default_timing_cache

    cache = tmp_path / "from-another-gpu.cache"
    cache.write_bytes(blob)
    with caplog.at_level("WARNING", logger="nvembed_sdk"):
        out = _build(fake_gpu, onnx_bundle, tmp_path / "engine", timing_cache=cache)
    assert cache.read_bytes() == blob  # the user's file is left as it was
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "rejected or unreadable" in warnings[0] and "fresh cache" in warnings[0], warnings
    fresh = default_timing_cache({"version": fake_gpu.version, "gpu_name": FAKE_GPU, "compute_capability": "9.0"})
    assert fresh.read_bytes() == f"TC:{FAKE_GPU}:1".encode() and str(tmp_path / "xdg") in str(fresh)
    m = json.loads((out / "nvembed.json").read_text())  # a complete bundle, not a plan without manifest
    assert m["tensorrt"]["timing_cache"] == str(fresh) and m["tensorrt"]["timing_cache_rejected"] == str(cache)
    assert (out / "engine.plan").stat().st_size == m["tensorrt"]["plan_bytes"]

    caplog.clear()
    with caplog.at_level("WARNING", logger="nvembed_sdk"):
        _build(fake_gpu, onnx_bundle, tmp_path / "again", timing_cache=cache)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "this machine's cache" in warnings[0], warnings
    assert fresh.read_bytes() == f"TC:{FAKE_GPU}:2".encode() and cache.read_bytes() == blob  # grown, not reset


def test_parser_errors_are_all_reported(fake_gpu, onnx_bundle, tmp_path):
    fake_gpu.parse_errors.extend([
        ("No importer registered for op: LatentPool.", 41, "/head/pool", "LatentPool", ["nvembed::Head"]),
        ("Assertion failed: inputs.size() == 2", 7, "/layers.0/attn/MatMul", "MatMul", ["Outer", "Inner"]),
        ("Unsupported ONNX data type: UINT4", -1, "", "", []),
        ("fourth", 3, "n3", "Add", []),
        ("fifth", 4, "n4", "Add", []),
    ])
    with pytest.raises(ArtifactError) as err:
        _build(fake_gpu, onnx_bundle, tmp_path / "engine", timing_cache=False)
    msg = str(err.value)
    assert "5 errors" in msg and "2 more" in msg and "\n" not in msg
    assert "No importer registered for op: LatentPool." in msg and "node 41" in msg and "'/head/pool'" in msg
    assert "op LatentPool" in msg and "in function nvembed::Head" in msg
    assert "node 7" in msg and "op MatMul" in msg and "in function Outer > Inner" in msg
    assert "UINT4" in msg and "fourth" not in msg
    assert not (tmp_path / "engine").exists()


def test_rejected_profile_raises(fake_gpu, onnx_bundle, tmp_path):
    from nvembed_sdk.errors import TensorRTError

    fake_gpu.faults.add("profile")
    with pytest.raises(TensorRTError, match=r"add_optimization_profile.*-1"):
        _build(fake_gpu, onnx_bundle, tmp_path / "engine", timing_cache=False)
    assert not (tmp_path / "engine").exists()


def test_an_interrupted_build_leaves_no_plan_without_its_manifest(fake_gpu, onnx_bundle, tmp_path, monkeypatch):
    from nvembed_sdk.exporters import trt_build

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands in for a kill while the manifest is written

    monkeypatch.setattr(trt_build, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        _build(fake_gpu, onnx_bundle, tmp_path / "engine", timing_cache=False)
    assert not (tmp_path / "engine").exists()  # staged (exporters/staging.py): nothing at the target
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".engine")]  # no staging dir left either


def test_runtime_refuses_a_plan_its_manifest_does_not_describe(fake_gpu, onnx_bundle, tmp_path):
    from nvembed_sdk import Embedder

    out = _build(fake_gpu, onnx_bundle, tmp_path / "engine", timing_cache=False)
    (out / "engine.plan").write_bytes(b"PLAN-" + fake_gpu.version.encode() + b"-other")
    with pytest.raises(ArtifactError, match="manifest records"):
        Embedder.load(out)


def test_execution_context_none_raises(fake_gpu, onnx_bundle, tmp_path):
    from nvembed_sdk import Embedder
    from nvembed_sdk.errors import TensorRTError

    out = _build(fake_gpu, onnx_bundle, tmp_path / "engine", timing_cache=False)
    fake_gpu.faults.add("context")
    with pytest.raises(TensorRTError, match="create_execution_context.*None"):
        Embedder.load(out)


@pytest.mark.parametrize("fault,match", [("address", "set_tensor_address"), ("shape", "set_input_shape")])
def test_refused_bindings_raise(fake_gpu, onnx_bundle, tmp_path, fault, match):
    from nvembed_sdk import Embedder
    from nvembed_sdk.errors import TensorRTError

    out = _build(fake_gpu, onnx_bundle, tmp_path / "engine", timing_cache=False)
    with Embedder.load(out) as e:
        fake_gpu.faults.add(fault)
        with pytest.raises(TensorRTError, match=match):
            e.embed(["dog"])


def test_cuda_major_is_recorded_and_checked(fake_gpu, onnx_bundle, tmp_path):
    from nvembed_sdk import Embedder

    out = _build(fake_gpu, onnx_bundle, tmp_path / "engine", timing_cache=False)
    assert json.loads((out / "nvembed.json").read_text())["tensorrt"]["cuda_major"] == "12"
    # The same TensorRT version, now the cu13 wheel: same version string, another build.
    sys.path.remove(str(tmp_path / "site-cu12"))
    fake_gpu.monkeypatch.syspath_prepend(str(_dist_info(tmp_path / "site-cu13", "tensorrt-cu13", fake_gpu.version)))
    with pytest.raises(ArtifactError, match=r"TensorRT CUDA build: built with 'cu12', this machine has 'cu13'"):
        Embedder.load(out)


def test_tensorrt_cuda_major_detection(tmp_path, monkeypatch):
    from nvembed_sdk.runtimes.trt import tensorrt_cuda_major

    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-cu" not in p])
    none = tmp_path / "absent"
    assert tensorrt_cuda_major(none) is None  # this machine: no TensorRT at all
    dpkg = tmp_path / "status"
    dpkg.write_text("Package: libnvinfer10\nStatus: install ok installed\nArchitecture: arm64\n"
                    "Version: 10.3.0.30-1+cuda12.5\n\nPackage: other\nVersion: 1.0+cuda11.8\n")
    assert tensorrt_cuda_major(dpkg) == "12"  # JetPack 6
    monkeypatch.syspath_prepend(str(_dist_info(tmp_path / "a", "tensorrt_cu13_libs", "11.1.0")))
    assert tensorrt_cuda_major(none) == "13"  # a pip install wins over dpkg
    monkeypatch.syspath_prepend(str(_dist_info(tmp_path / "b", "tensorrt-cu12-bindings", "10.16.1")))
    assert tensorrt_cuda_major(none) is None  # two CUDA builds installed: cannot tell which one loads


def test_engine_mismatch_cuda_major_is_optional_for_old_manifests():
    built = {"version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "platform": "aarch64"}
    here = {**built, "cuda_major": "12"}
    assert engine_mismatch(built, here) == []  # not recorded by older builds: the rest decides
    assert engine_mismatch({**built, "cuda_major": "13"}, here) == [
        "TensorRT CUDA build: built with 'cu13', this machine has 'cu12'"]


def test_runtime_flow_with_fake_tensorrt(fake_gpu, onnx_bundle, tiny_checkpoint, tmp_path):
    from nvembed_sdk import Embedder

    from conftest import SAMPLE_TEXTS, assert_close_cos

    out = _build(fake_gpu, onnx_bundle, tmp_path / "engine", timing_cache=False)
    texts = [*SAMPLE_TEXTS, "dog", "a b", "x"] * 2
    ref = Embedder.load(tiny_checkpoint, device="cpu").embed(texts, max_length=64)
    calls = fake_gpu.calls
    calls.clear()
    with Embedder.load(out / "engine.plan") as e:
        assert e.backend == "tensorrt" and e.text.max_length == 64 and e.runner.profiles[1] == ((2, 1), (2, 64), (3, 64))
        got = e.embed(texts, batch_size=7)
        runs = [c[1:] for c in calls if c[0] == "execute"]
        assert {p for p, _, _ in runs} == {0, 1} and e.runner.profile_hits[0] > 0 and e.runner.profile_hits[1] > 0
        assert all(b <= (4, 3)[p] for p, b, _ in runs)  # batches of 7 split to the profiles' max batch
        one = e.text.collate(e.text.tokenize(["word " * 18], "", 64), 0)  # 1 row, 16 < seq <= 64
        row = e.runner.run(one)
        assert calls[-1] == ("execute", 1, 2, one.input_ids.shape[1])  # padded to profile 1's min batch 2
        assert_close_cos(row, Embedder.load(tiny_checkpoint, device="cpu").embed(["word " * 18], max_length=64), 0.9999)
        with pytest.raises(InputError, match="max_length <= 64"):
            e.embed(["word " * 100], max_length=100)
    assert_close_cos(got, ref, 0.9999)  # fp16 output rounding only

    m = json.loads((out / "nvembed.json").read_text())
    m["tensorrt"]["gpu_name"] = "NVIDIA Other GPU"
    (out / "nvembed.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"NVIDIA Other GPU.*rebuild it here: nvembed-export --model "):
        Embedder.load(out)
    with Embedder.load(out, strict=False) as e:
        assert e.embed("dog").shape == (64,)


# ---- tests/gpu: INT8/FP8 without ModelOpt skip, saying why ----------------------------------------


def test_gpu_quantised_tests_skip_without_modelopt(monkeypatch):
    """tests/gpu/test_tensorrt.py is skipped here (no GPU); its ModelOpt check is defined before that skip."""
    import contextlib
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "gpu" / "test_tensorrt.py"
    spec = importlib.util.spec_from_file_location("_gpu_test_tensorrt", path)
    mod = importlib.util.module_from_spec(spec)
    with contextlib.suppress(pytest.skip.Exception):  # the module-level skip (no CUDA GPU / TensorRT here)
        spec.loader.exec_module(mod)
    reason_for = mod.__dict__["quantizer_skip_reason"]
    assert reason_for("fp16") is None
    monkeypatch.setitem(sys.modules, "modelopt", None)  # import modelopt -> ImportError
    monkeypatch.setitem(sys.modules, "modelopt.onnx", None)
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", None)
    for precision in ("int8", "fp8"):
        reason = reason_for(precision)
        assert reason and "ModelOpt" in reason and "nvidia-modelopt" in reason and precision.upper() in reason
