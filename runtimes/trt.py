"""TensorRT backend: runs an ``engine.plan`` bundle written by ``nvembed-export --to tensorrt``.

Written against the TensorRT 10.3 ... 11.x Python API (name-based I/O: ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``); device buffers are torch CUDA tensors and the
stream is a ``torch.cuda.Stream``, so no extra CUDA binding is needed.

An engine only runs on the GPU model, platform and TensorRT build that built it. The bundle's
manifest records them (with the CUDA major of the TensorRT build: the cu12 and cu13 wheels share
one version string) and :class:`TrtBackend` refuses a mismatch before deserialising, with the
command that rebuilds the engine here (see :func:`engine_mismatch` and :func:`rebuild_command`).

Every TensorRT call that reports failure by its return value is checked (``None`` from
``create_execution_context``, ``False`` from ``set_input_shape``, ``set_tensor_address``,
``set_optimization_profile_async`` and ``execute_async_v3``, per the 10.3-11.x bindings'
``pyCore.cpp``) and raises :class:`~nvembed_sdk.errors.TensorRTError`.

Batches are fitted to the engine's optimisation profiles (:func:`plan_batches`): the tightest
profile that holds the sequence length is chosen, a batch larger than its max batch is split,
and a batch or length below the profile's minimum is padded (padding rows are copies of the
first row, padding columns are masked out, and both are dropped from the result).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import platform
import re
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk._optional import require
from nvembed_sdk.errors import ArtifactError, BackendUnavailableError, InputError, NVEmbedError, TensorRTError, fmt
from nvembed_sdk.manifest import INPUT_NAMES, OUTPUT_NAME, read_manifest
from nvembed_sdk.runtimes.base import Backend
from nvembed_sdk.text import Batch

log = logging.getLogger("nvembed_sdk")

# (min, opt, max), each (batch, seq)
ProfileShape = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


# ---- machine facts and the compatibility check (pure; tested without TensorRT) -------------------


def cuda_device_index(requested: str | None) -> int:
    """The CUDA device index for ``requested`` (None, ``auto``, ``cuda``, ``cuda:N``).

    Raises:
        InputError: a non-CUDA device was asked for, or an index that does not exist.
        BackendUnavailableError: no CUDA GPU is visible to torch.
    """
    import torch

    if requested not in (None, "auto") and torch.device(requested).type != "cuda":
        raise InputError(fmt("device", repr(requested), "TensorRT runs on CUDA GPUs only: device='cuda' or 'cuda:N'"))
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise BackendUnavailableError(fmt(
            "CUDA", f"no GPU visible ({build})",
            "TensorRT needs an NVIDIA GPU, its driver and a CUDA build of torch "
            "(on Jetson, the JetPack torch wheel); use the onnxruntime or torch backend on CPU"))
    index = torch.device(requested).index if requested not in (None, "auto", "cuda") else None
    if index is None:
        index = torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise InputError(fmt("device", repr(requested), f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}"))
    return int(index)


_CU_DIST = re.compile(r"tensorrt[-_.]cu(\d+)(?:[-_.](?:libs|bindings))?")
_CU_DEB = re.compile(r"^Package: libnvinfer\d+\n(?:[^\n]+\n)*?Version: [^\n]*\+cuda(\d+)\.", re.M)


_DPKG_STATUS = "/var/lib/dpkg/status"


def tensorrt_cuda_major(dpkg_status: str | Path | None = None) -> str | None:
    """The CUDA major version the installed TensorRT was built for (``"12"``, ``"13"``), or None.

    ``tensorrt.__version__`` does not say it: the cu12 and cu13 builds of one release share the
    version string. pip installs name it: the ``tensorrt`` metapackage pulls ``tensorrt-cu12``
    (or ``-cu13``) with ``tensorrt-cu12-libs`` and ``tensorrt-cu12-bindings`` (NVIDIA/TensorRT
    ``python/packaging/tensorrt_build_backend``: ``f"{base_name}_cu{cuda_major}_libs"``).
    JetPack and the NVIDIA apt repository install Debian packages whose version carries it
    (``libnvinfer10 10.3.0.30-1+cuda12.5``).
    """
    majors = set()
    for dist in importlib.metadata.distributions():
        m = _CU_DIST.fullmatch(str(dist.metadata.get("Name") or "").lower())
        if m:
            majors.add(m.group(1))
    status = Path(dpkg_status or _DPKG_STATUS)
    if not majors and status.is_file():
        majors = set(_CU_DEB.findall(status.read_text(errors="replace")))
    return majors.pop() if len(majors) == 1 else None  # none, or two CUDA builds installed: cannot tell


def machine_facts(trt_version: str, device_index: int) -> dict[str, Any]:
    """What a plan is tied to, for this machine: TensorRT version and CUDA build, GPU name,
    compute capability, platform."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return {
        "version": str(trt_version),
        "cuda_major": tensorrt_cuda_major(),
        "gpu_name": torch.cuda.get_device_name(device_index),
        "compute_capability": f"{major}.{minor}",
        "platform": platform.machine(),
    }


_FACTS = (("version", "TensorRT"), ("cuda_major", "TensorRT CUDA build"), ("gpu_name", "GPU"),
          ("compute_capability", "compute capability"), ("platform", "platform"))
_OPTIONAL_FACTS = ("platform", "cuda_major")  # manifests before they were recorded; still decided by the rest


def engine_mismatch(built: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """Differences between the machine that built an engine and this one.

    Args:
        built: the manifest's ``tensorrt`` section (``version``, ``cuda_major``, ``gpu_name``,
            ``compute_capability``, ``platform``).
        here: :func:`machine_facts` of this machine.

    Returns:
        One phrase per difference (empty when the engine can run here).
    """
    out = []
    for key, label in _FACTS:
        a, b = built.get(key), here.get(key)
        if key in _OPTIONAL_FACTS and (a is None or b is None):
            if key == "cuda_major" and a is not None:  # this machine's TensorRT build is unknown
                log.warning("cannot tell which CUDA major this TensorRT is built for; the engine was built "
                            "with a cu%s TensorRT", a)
            continue
        if a is None:
            out.append(f"{label}: not recorded in the manifest")
        elif " ".join(str(a).split()) != " ".join(str(b).split()):
            shown = (f"cu{a}", f"cu{b}") if key == "cuda_major" else (a, b)
            out.append(f"{label}: built with {shown[0]!r}, this machine has {shown[1]!r}")
    return out


def rebuild_command(manifest: dict[str, Any], bundle_dir: str | Path) -> str:
    """The ``nvembed-export`` command that rebuilds this engine bundle on the current machine."""
    trt_info = manifest.get("tensorrt", {})
    source = manifest.get("source", {}).get("onnx") or "ONNX_BUNDLE_DIR"
    parts = ["nvembed-export", "--model", str(source), "--to", "tensorrt",
             "--precision", str(manifest.get("precision", "fp16")),
             "--target", str(manifest.get("target", "datacenter"))]
    for p in trt_info.get("profiles", []):
        try:
            parts += ["--profile", ":".join(f"{b}x{s}" for b, s in (p["min"], p["opt"], p["max"]))]
        except (KeyError, TypeError, ValueError):
            continue
    parts += ["--output", str(bundle_dir)]
    return shlex.join(parts)


# ---- profile choice (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """Rows ``[lo, hi)`` of a batch, run under ``profile`` at shape ``(batch, seq)`` (>= the real shape)."""

    profile: int
    lo: int
    hi: int
    batch: int
    seq: int


def _choose(profiles: list[ProfileShape], n: int, seq: int) -> int:
    fits = [i for i, (_, _, hi) in enumerate(profiles) if seq <= hi[1]]
    if not fits:
        longest = max(hi[1] for _, _, hi in profiles)
        raise InputError(fmt(
            "sequence length", f"{seq} tokens",
            f"this engine's profiles stop at {longest} tokens; embed with max_length <= {longest} "
            f"(the default for this engine) or rebuild with a longer profile, e.g. --profile 1x1:1x{seq}:4x{seq}"))

    def key(i: int) -> tuple:
        lo, _, hi = profiles[i]
        # No padding first, then the batch fits without splitting, then the tightest seq range
        # (kernels tuned nearest this length), then the fewest splits.
        return (lo[1] > seq or lo[0] > n, n > hi[0], hi[1], -min(n, hi[0]))

    return min(fits, key=key)


def plan_batches(profiles: list[ProfileShape], batch: int, seq: int) -> list[Chunk]:
    """Split a ``(batch, seq)`` input over an engine's profiles.

    Args:
        profiles: the engine's profiles, ``((min_b, min_s), (opt_b, opt_s), (max_b, max_s))`` each.
        batch: rows in the batch (>= 1).
        seq: padded sequence length of the batch (>= 1).

    Returns:
        Chunks covering rows ``0 .. batch`` in order.

    Raises:
        InputError: ``seq`` is longer than every profile's max seq.
    """
    if not profiles:
        raise ArtifactError(fmt("engine", "no optimisation profiles", "an engine built by nvembed-export"))
    chunks: list[Chunk] = []
    lo = 0
    while lo < batch:
        n = batch - lo
        i = _choose(profiles, n, seq)
        (min_b, min_s), _, (max_b, _) = profiles[i]
        take = min(n, max_b)
        chunks.append(Chunk(i, lo, lo + take, max(take, min_b), max(seq, min_s)))
        lo += take
    return chunks


def _pad(a: np.ndarray, rows: int, cols: int, fill: int) -> np.ndarray:
    n, t = a.shape
    if (n, t) == (rows, cols):
        return np.ascontiguousarray(a)
    out = np.full((rows, cols), fill, dtype=a.dtype)
    out[:n, :t] = a
    out[n:, :t] = a[0]  # padding rows copy row 0 (a fully masked row could give NaN); dropped after
    return out


# ---- the backend ----------------------------------------------------------------------------------


def _torch_dtypes(trt: Any) -> dict[Any, Any]:
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "BOOL": torch.bool}
    return {getattr(trt.DataType, k): v for k, v in table.items() if hasattr(trt.DataType, k)}


class TrtBackend(Backend):
    """Runs a TensorRT engine bundle (``engine.plan`` + ``nvembed.json`` + tokenizer).

    Options:
        strict: refuse an engine whose manifest's GPU name, compute capability, platform or
            TensorRT version differ from this machine's. Defaults to True. With False a
            mismatch is logged and deserialisation is attempted anyway (e.g. H100 SXM vs PCIe).
    """

    name = "tensorrt"

    def _load(self) -> None:
        plan_path, directory = self._paths()
        manifest = read_manifest(directory)
        if manifest.get("kind") != "tensorrt":
            raise ArtifactError(fmt(str(directory / "nvembed.json"), f"kind {manifest.get('kind')!r}",
                                    "a TensorRT bundle (kind 'tensorrt') written by nvembed-export --to tensorrt"))
        trt = require("tensorrt")  # fails fast, naming the extra, before CUDA or the plan is touched
        import torch

        index = cuda_device_index(self.requested_device)
        here = machine_facts(trt.__version__, index)
        problems = engine_mismatch(manifest.get("tensorrt", {}), here)
        if problems:
            msg = fmt(str(plan_path), "; ".join(problems),
                      "a TensorRT engine runs only on the GPU model, platform and TensorRT version that built it; "
                      f"rebuild it here: {rebuild_command(manifest, directory)}")
            if self.options.get("strict", True):
                raise ArtifactError(msg)
            log.warning("strict=False, loading anyway: %s", msg)

        if not plan_path.is_file():
            raise ArtifactError(fmt(str(plan_path), "no such file",
                                    f"a complete engine bundle; rebuild it: {rebuild_command(manifest, directory)}"))
        expected = manifest.get("tensorrt", {}).get("plan_bytes")
        size = plan_path.stat().st_size
        if isinstance(expected, int) and expected != size:
            # The build writes the manifest before it renames the plan into place: a mismatch is an
            # interrupted rebuild (or a plan copied over), never an engine to run.
            raise ArtifactError(fmt(str(plan_path), f"{size} bytes, the manifest records {expected}",
                                    "the plan is not the one this manifest describes (an interrupted build?); "
                                    f"rebuild it: {rebuild_command(manifest, directory)}"))

        self._torch = torch
        self._index = index
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(index):
            self._runtime = trt.Runtime(self._logger)
            blob = plan_path.read_bytes()
            digest = manifest.get("tensorrt", {}).get("plan_sha256")
            if digest and size < (2 << 30) and hashlib.sha256(blob).hexdigest() != digest:  # cheap next to deserialising
                raise ArtifactError(fmt(str(plan_path), "a sha256 other than the manifest's",
                                        "the plan is not the one this manifest describes (an interrupted build?); "
                                        f"rebuild it: {rebuild_command(manifest, directory)}"))
            engine = self._runtime.deserialize_cuda_engine(blob)
            del blob
            if engine is None:
                raise ArtifactError(fmt(str(plan_path), "TensorRT could not deserialise it (see the log above)",
                                        f"rebuild it here: {rebuild_command(manifest, directory)}"))
            self._engine = engine
            context = engine.create_execution_context()
            if context is None:  # nullptr -> None: usually the device memory for the activations ran out
                raise TensorRTError(fmt(
                    "TensorRT create_execution_context", f"returned None for {plan_path} (see the log above)",
                    "free GPU memory (other processes, a second engine) or rebuild with smaller --profile max "
                    "shapes, which size the activation memory"))
            self._context = context
            self._stream = torch.cuda.Stream(device=index)

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        unknown = set(self._inputs) - set(INPUT_NAMES)
        if unknown or "input_ids" not in self._inputs or OUTPUT_NAME not in outputs:
            raise ArtifactError(fmt(str(plan_path), f"inputs {self._inputs}, outputs {outputs}",
                                    f"inputs from {list(INPUT_NAMES)} and output {OUTPUT_NAME!r}"))
        self._output = OUTPUT_NAME
        dtypes = _torch_dtypes(trt)
        self._dtypes = {n: dtypes[engine.get_tensor_dtype(n)] for n in [*self._inputs, OUTPUT_NAME]}

        # Profiles as read back from the engine (the manifest copy is for humans and rebuilds).
        self.profiles: list[ProfileShape] = []
        for i in range(engine.num_optimization_profiles):
            lo, opt, hi = (tuple(int(v) for v in dims) for dims in engine.get_tensor_profile_shape("input_ids", i))
            self.profiles.append((lo, opt, hi))  # type: ignore[arg-type]
        self.profile_hits = [0] * len(self.profiles)  # chunks run per profile (tests, bench)
        self._active = 0  # a fresh context starts on profile 0

        model, text = manifest.get("model", {}), manifest.get("text", {})
        self.manifest = manifest
        self.precision = str(manifest.get("precision", "fp32"))
        self.dim = int(model.get("dim") or int(engine.get_tensor_shape(OUTPUT_NAME)[-1]))
        self.device = f"cuda:{index}"
        self.normalizes_output = True
        longest = max(hi[1] for _, _, hi in self.profiles)
        self.max_length = min(int(text.get("max_length") or longest), longest)
        self._pad_id = int(text.get("pad_id") or 0)

        # Buffers sized once for the largest profile; _buffer() grows them if a shape ever needs more.
        self._buffers: dict[str, Any] = {}
        big_b = max(hi[0] for _, _, hi in self.profiles)
        with torch.cuda.device(index):
            for n in self._inputs:
                self._buffer(n, big_b * longest)
            self._buffer(OUTPUT_NAME, big_b * self.dim)
        self._run_lock = threading.Lock()  # one execution context: runs are serialised

    def _paths(self) -> tuple[Path, Path]:
        if self.path.is_dir():
            m = read_manifest(self.path)
            return self.path / str(m.get("files", {}).get("model", "engine.plan")), self.path
        return self.path, self.path.parent

    def _buffer(self, name: str, numel: int) -> Any:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self._torch.empty(numel, dtype=self._dtypes[name], device=f"cuda:{self._index}")
            self._buffers[name] = buf
        return buf

    def _run(self, batch: Batch) -> np.ndarray:
        torch = self._torch
        feeds = batch.as_dict()
        rows, seq = batch.input_ids.shape
        out = np.empty((rows, self.dim), dtype=np.float32)
        plan = plan_batches(self.profiles, rows, seq)
        with self._run_lock, torch.cuda.device(self._index), torch.cuda.stream(self._stream):
            for ch in plan:
                out[ch.lo : ch.hi] = self._execute(ch, {k: feeds[k][ch.lo : ch.hi] for k in self._inputs})
        return out

    def _execute(self, ch: Chunk, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch, ctx, handle = self._torch, self._context, self._stream.cuda_stream
        if ch.profile != self._active:
            if not ctx.set_optimization_profile_async(ch.profile, handle):
                raise TensorRTError(fmt("TensorRT set_optimization_profile_async", f"refused profile {ch.profile}",
                                        f"one of the engine's {len(self.profiles)} profiles"))
            self._active = ch.profile
        self.profile_hits[ch.profile] += 1
        shape = (ch.batch, ch.seq)
        for name, host in feeds.items():
            fill = self._pad_id if name == "input_ids" else 0  # padded columns are masked out
            view = self._buffer(name, ch.batch * ch.seq)[: ch.batch * ch.seq].view(shape)
            view.copy_(torch.from_numpy(_pad(host, ch.batch, ch.seq, fill)))  # on self._stream
            if not ctx.set_input_shape(name, shape):
                raise TensorRTError(fmt(f"TensorRT set_input_shape({name!r})", f"shape {shape} rejected",
                                        f"inside profile {ch.profile}: {self.profiles[ch.profile]}"))
            self._bind(name, view.data_ptr())
        out_shape = tuple(int(v) for v in ctx.get_tensor_shape(self._output))  # (batch, dim)
        if len(out_shape) != 2 or out_shape[0] != ch.batch or min(out_shape) < 1:
            raise NVEmbedError(fmt("TensorRT output shape", out_shape, f"({ch.batch}, {self.dim})"))
        obuf = self._buffer(self._output, out_shape[0] * out_shape[1])[: out_shape[0] * out_shape[1]]
        self._bind(self._output, obuf.data_ptr())
        if not ctx.execute_async_v3(handle):
            raise TensorRTError(fmt("TensorRT execute_async_v3", "failed (see the log above)",
                                    f"shape {shape} inside profile {ch.profile}: {self.profiles[ch.profile]}"))
        n = ch.hi - ch.lo
        # .cpu() on the current (= engine) stream waits for the engine; fp16 outputs widen here.
        return obuf.view(out_shape)[:n].float().cpu().numpy()

    def _bind(self, name: str, ptr: int) -> None:
        # False for an unknown name, a null pointer or one not aligned for the tensor's type.
        if not self._context.set_tensor_address(name, ptr):
            raise TensorRTError(fmt(f"TensorRT set_tensor_address({name!r})", f"refused address {ptr:#x}",
                                    "a device buffer of the engine's tensor type, 256-byte aligned (see the log above)"))

    def _close(self) -> None:
        # Context before engine before runtime (TensorRT's destruction order).
        for attr in ("_context", "_engine", "_runtime", "_buffers", "_stream"):
            if hasattr(self, attr):
                delattr(self, attr)
