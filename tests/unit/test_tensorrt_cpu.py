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
    t0 = time.perf_counter()
    with pytest.raises(InputError) as err:
        check_target("jetson-orin", "fp8")
    assert time.perf_counter() - t0 < 0.1
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
    t0 = time.perf_counter()
    with pytest.raises(BackendUnavailableError) as err:
        build_engine(onnx_bundle, tmp_path / "out", precision="fp16")
    assert time.perf_counter() - t0 < 10
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
    assert rc != 0 and seconds < 10, (rc, seconds, out)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and "tensorrt" in lines[0] and "pip install -e '.[tensorrt]'" in lines[0], out


def test_cli_orin_fp8_fails_naming_int8_and_fp16(tiny_checkpoint, tmp_path):
    rc, out, seconds = _run_cli(["--model", str(tiny_checkpoint), "--to", "tensorrt", "--precision", "fp8",
                                 "--target", "jetson-orin", "--output", str(tmp_path / "out")])
    assert rc != 0 and seconds < 10, (rc, seconds, out)
    assert "INT8" in out and "FP16" in out


# ---- the build and run control flow against a fake `tensorrt` (CPU) ---------------------------------
# The fake records the calls and its "engine" runs the tiny torch model on the bound buffers, so
# these tests check our own logic (profiles, flags, timing cache, manifest, batching, padding,
# buffer binding, output slicing), not TensorRT's behaviour, which only tests/gpu can check.

FAKE_FACTS = {"version": "10.3.0", "gpu_name": "NVIDIA Fake GPU", "compute_capability": "9.0", "platform": "x86_64"}


def _fake_trt(model, calls: list, profiles: list):
    import importlib.machinery
    import types

    import torch

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo calls find_spec on it
    trt.__version__ = FAKE_FACTS["version"]
    trt.DataType = types.SimpleNamespace(FLOAT="f32", HALF="f16", INT64="i64")
    trt.Logger = type("Logger", (), {"VERBOSE": 0, "WARNING": 1, "__init__": lambda s, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="detailed")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16", INT8="INT8", FP8="FP8")
    names = [*("input_ids", "attention_mask", "pool_mask"), "embeddings"]
    memory: dict[int, torch.Tensor] = {}  # data_ptr -> CPU buffer standing in for device memory

    class Net:
        num_inputs, num_outputs = 3, 1

        def get_input(self, i):
            return types.SimpleNamespace(name=names[i])

        def get_output(self, i):
            return types.SimpleNamespace(name="embeddings")

    class Config:
        def __getattr__(self, name):  # set_memory_pool_limit, set_flag, add_optimization_profile, ...
            return lambda *a, **k: calls.append((name, *a))

        def create_timing_cache(self, blob):
            calls.append(("timing_cache_in", bytes(blob)))
            return object()

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"TIMING")

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return Net()

        create_builder_config = staticmethod(Config)

        def create_optimization_profile(self):
            return types.SimpleNamespace(set_shape=lambda *a: calls.append(("set_shape", *a)))

        def build_serialized_network(self, network, config):
            return b"PLAN"

    class Parser:
        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            return True

    class Context:
        def __init__(self):
            self.shapes, self.addr, self.profile = {}, {}, 0

        def set_optimization_profile_async(self, i, stream):
            self.profile = i
            return True

        def set_input_shape(self, name, shape):
            lo, _, hi = profiles[self.profile]
            self.shapes[name] = shape
            return all(a <= b <= c for a, b, c in zip(lo, shape, hi, strict=True))

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def get_tensor_shape(self, name):
            return (self.shapes["input_ids"][0], model.cfg.dim)

        def execute_async_v3(self, stream):
            b, t = self.shapes["input_ids"]
            x = [memory[self.addr[n]][: b * t].view(b, t) for n in names[:3]]
            calls.append(("execute", self.profile, b, t))
            with torch.no_grad():
                memory[self.addr["embeddings"]][: b * model.cfg.dim].view(b, -1).copy_(model(*x, normalize=True))
            return True

    class Engine:
        num_io_tensors, num_optimization_profiles = 4, len(profiles)

        def get_tensor_name(self, i):
            return names[i]

        def get_tensor_mode(self, name):
            return "out" if name == "embeddings" else "in"

        def get_tensor_dtype(self, name):
            return "f16" if name == "embeddings" else "i64"  # an fp16 output is widened by the backend

        def get_tensor_profile_shape(self, name, i):
            return profiles[i]

        def create_execution_context(self):
            return Context()

    trt.Builder, trt.OnnxParser = Builder, Parser
    trt.Runtime = type("Runtime", (), {"__init__": lambda s, log: None,
                                       "deserialize_cuda_engine": lambda s, plan: Engine() if plan == b"PLAN" else None})
    return trt, memory


@pytest.fixture()
def fake_gpu(monkeypatch, tiny_model):
    """A fake tensorrt module and CPU stand-ins for the CUDA calls."""
    import contextlib
    import types

    import torch

    from nvembed_sdk.exporters import trt_build
    from nvembed_sdk.runtimes import trt as rt

    calls: list = []
    profiles = [((1, 1), (2, 16), (4, 16)), ((2, 1), (2, 64), (3, 64))]
    trt, memory = _fake_trt(tiny_model, calls, profiles)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(rt, "cuda_device_index", lambda device: 0)
    monkeypatch.setattr(rt, "machine_facts", lambda version, index: dict(FAKE_FACTS))
    monkeypatch.setattr(trt_build, "preflight", lambda precision, target="datacenter", device=None:
                        trt_build.BuildEnv(trt, check_target(target, precision), 0, dict(FAKE_FACTS)))

    def cpu_buffer(self, name, numel):
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[name] = torch.zeros(numel, dtype=self._dtypes[name])
            memory[buf.data_ptr()] = buf
        return buf

    monkeypatch.setattr(rt.TrtBackend, "_buffer", cpu_buffer)
    return calls


def test_build_flow_with_fake_tensorrt(fake_gpu, onnx_bundle, tmp_path):
    cache = tmp_path / "timing.cache"
    out = build_engine(onnx_bundle, tmp_path / "engine", precision="fp16", timing_cache=cache,
                       profiles=["1x1:2x16:4x16", "2x1:2x64:3x64"])
    names = {c[0] for c in fake_gpu}
    assert ("network_flags", 1 << 5) in fake_gpu  # fp16 ONNX -> strongly typed on 10.x
    assert ("parse_from_file", str(onnx_bundle / "model.onnx")) in fake_gpu
    assert ("set_memory_pool_limit", "workspace", 8 << 30) in fake_gpu and "set_flag" not in names
    assert [c for c in fake_gpu if c[0] == "set_shape"][:3] == [
        ("set_shape", n, (1, 1), (2, 16), (4, 16)) for n in ("input_ids", "attention_mask", "pool_mask")]
    assert ("timing_cache_in", b"") in fake_gpu and cache.read_bytes() == b"TIMING"
    assert (out / "engine.plan").read_bytes() == b"PLAN" and (out / "tokenizer.json").is_file()
    m = json.loads((out / "nvembed.json").read_text())
    assert m["kind"] == "tensorrt" and m["files"] == {"model": "engine.plan"} and m["model"] == {"dim": 64}
    assert m["text"]["max_length"] == 64 and m["tensorrt"]["gpu_name"] == "NVIDIA Fake GPU"
    assert m["tensorrt"]["profiles"][1] == {"min": [2, 1], "opt": [2, 64], "max": [3, 64]}
    assert m["source"]["onnx"] == str(onnx_bundle.resolve()) and len(m["source"]["onnx_sha256"]) == 64

    fake_gpu.clear()
    build_engine(onnx_bundle, tmp_path / "weak", precision="fp16", timing_cache=cache, strongly_typed=False)
    assert ("network_flags", 0) in fake_gpu and ("set_flag", "FP16") in fake_gpu
    assert ("timing_cache_in", b"TIMING") in fake_gpu  # the cache file is reused


def test_runtime_flow_with_fake_tensorrt(fake_gpu, onnx_bundle, tiny_checkpoint, tmp_path):
    from nvembed_sdk import Embedder

    from conftest import SAMPLE_TEXTS, assert_close_cos

    out = build_engine(onnx_bundle, tmp_path / "engine", precision="fp16", timing_cache=False,
                       profiles=["1x1:2x16:4x16", "2x1:2x64:3x64"])
    texts = [*SAMPLE_TEXTS, "dog", "a b", "x"] * 2
    ref = Embedder.load(tiny_checkpoint, device="cpu").embed(texts, max_length=64)
    fake_gpu.clear()
    with Embedder.load(out / "engine.plan") as e:
        assert e.backend == "tensorrt" and e.text.max_length == 64 and e.runner.profiles[1] == ((2, 1), (2, 64), (3, 64))
        got = e.embed(texts, batch_size=7)
        runs = [c[1:] for c in fake_gpu if c[0] == "execute"]
        assert {p for p, _, _ in runs} == {0, 1} and e.runner.profile_hits[0] > 0 and e.runner.profile_hits[1] > 0
        assert all(b <= (4, 3)[p] for p, b, _ in runs)  # batches of 7 split to the profiles' max batch
        one = e.text.collate(e.text.tokenize(["word " * 18], "", 64), 0)  # 1 row, 16 < seq <= 64
        row = e.runner.run(one)
        assert fake_gpu[-1] == ("execute", 1, 2, one.input_ids.shape[1])  # padded to profile 1's min batch 2
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
