"""ONNX bundle -> TensorRT engine bundle (``engine.plan`` + ``nvembed.json`` + tokenizer).

Written against the TensorRT 10.3 ... 11.x Python API:

* TensorRT 11 networks are always strongly typed and the FP16/BF16/INT8/FP8 builder flags are
  gone: the precision comes from the ONNX (fp16/bf16 ONNX, or INT8/FP8 Q/DQ from ModelOpt).
* TensorRT 10.x: an ONNX that already carries the precision is built strongly typed
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``); an fp32 ONNX can still be built fp16/bf16
  weakly typed with the builder flag, as ``trtexec --fp16`` does (JetPack 6's TensorRT 10.3).
  ``strongly_typed=False`` builds a Q/DQ graph weakly typed with INT8/FP8 + FP16 flags, so the
  non-quantised layers may run in fp16 (``trtexec --fp16 --int8``).

The builder never calibrates: INT8 and FP8 need a Q/DQ bundle (``nvembed-export --to onnx
--precision int8|fp8``). Engines are tied to the GPU model, platform and TensorRT build (version
and the CUDA major of the wheel: cu12 and cu13 share a version string) that built them, so the
manifest records those and the runtime refuses a mismatch.

Failures TensorRT reports by return value are checked: parse errors are reported all at once
(count, then description, node, operator and local-function stack), a rejected profile raises
:class:`~nvembed_sdk.errors.TensorRTError`, a rejected or unreadable timing cache is replaced by a
fresh one with one warning line. The plan is renamed into place only after the manifest that
describes it is written, so an interrupted build never leaves a plan with a wrong manifest.

:func:`preflight` runs every check that needs no ONNX (target, precision, TensorRT import, GPU,
compute capability) in well under a second when something is missing; the CLI calls it before
it exports anything.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvembed_sdk._optional import require
from nvembed_sdk.errors import ArtifactError, InputError, NVEmbedError, TensorRTError, fmt
from nvembed_sdk.exporters.targets import (
    QDQ_PRECISIONS,
    Profile,
    Target,
    check_build_host,
    check_compute_capability,
    check_target,
    fit_profiles,
    parse_profiles,
    sort_profiles,
)
from nvembed_sdk.manifest import INPUT_NAMES, MANIFEST, OUTPUT_NAME, read_manifest, sha256_file, write_manifest
from nvembed_sdk.text import TOKENIZER_FILES

log = logging.getLogger("nvembed_sdk")

ENGINE_FILE = "engine.plan"


@dataclass
class BuildEnv:
    """What :func:`preflight` found: the TensorRT module, the target and the build GPU."""

    trt: Any
    target: Target
    device_index: int
    facts: dict[str, str]  # runtimes.trt.machine_facts: version, gpu_name, compute_capability, platform

    @property
    def trt_major(self) -> int:
        return int(str(self.facts["version"]).split(".")[0])


def preflight(precision: str, target: str = "datacenter", device: str | None = None) -> BuildEnv:
    """Every check that needs no ONNX, cheapest first; fails fast with one line.

    Order: target and precision (pure) -> build host platform -> ``import tensorrt`` -> a CUDA
    GPU -> the GPU's compute capability for the precision.

    Args:
        precision: ``fp32``, ``fp16``, ``bf16``, ``int8`` or ``fp8``.
        target: ``datacenter``, ``jetson-orin`` or ``jetson-thor``. Defaults to datacenter.
        device: ``cuda`` or ``cuda:N``. Defaults to the current CUDA device.

    Returns:
        A :class:`BuildEnv`.

    Raises:
        InputError: impossible target/precision/GPU combination.
        BackendUnavailableError: TensorRT is not installed or no CUDA GPU is visible.
    """
    t = check_target(target, precision)
    check_build_host(t, platform.machine())
    trt = require("tensorrt")
    from nvembed_sdk.runtimes.trt import cuda_device_index, machine_facts

    index = cuda_device_index(device)
    facts = machine_facts(trt.__version__, index)
    major, minor = (int(v) for v in facts["compute_capability"].split("."))
    check_compute_capability(precision, (major, minor), facts["gpu_name"])
    return BuildEnv(trt, t, index, facts)


def plan_precision(requested: str, onnx_precision: str, trt_major: int,
                   strongly_typed: bool | None = None) -> tuple[bool, tuple[str, ...]]:
    """How to get ``requested`` out of an ONNX in ``onnx_precision`` with this TensorRT.

    Args:
        requested: engine precision.
        onnx_precision: the ONNX bundle's ``precision`` (``int8``/``fp8`` mean Q/DQ).
        trt_major: TensorRT major version (10 or 11).
        strongly_typed: force the network typing; None picks (strong whenever the ONNX
            already carries the precision).

    Returns:
        (strongly typed network, names of ``trt.BuilderFlag`` members to set).

    Raises:
        InputError: the combination cannot be built; the message says which bundle to export.
    """
    export = f"nvembed-export --model CHECKPOINT --to onnx --precision {requested}"
    if trt_major >= 11:
        if strongly_typed is False:
            raise InputError(fmt("strongly_typed=False", f"TensorRT {trt_major}",
                                 "TensorRT 11 networks are always strongly typed; drop the option"))
        if requested != onnx_precision:
            raise InputError(fmt(
                f"--precision {requested}", f"a {onnx_precision} ONNX bundle with TensorRT {trt_major}",
                f"TensorRT 11 takes the precision from the ONNX (no builder flags); build from a {requested} "
                f"bundle: {export}"))
        return True, ()
    if requested in QDQ_PRECISIONS:
        if onnx_precision != requested:
            raise InputError(fmt(
                f"--precision {requested}", f"a {onnx_precision} ONNX bundle (no {requested.upper()} Q/DQ)",
                f"INT8/FP8 engines are built from a quantised Q/DQ bundle (the builder never calibrates): {export}"))
        if strongly_typed is False:
            return False, (requested.upper(), "FP16")
        return True, ()
    if requested == onnx_precision:
        if strongly_typed is False and requested in ("fp16", "bf16"):
            return False, (requested.upper(),)  # weak typing computes in fp32 unless the flag allows fp16
        return (strongly_typed is not False), ()
    if onnx_precision == "fp32" and requested in ("fp16", "bf16"):
        if strongly_typed:
            raise InputError(fmt(f"--precision {requested} with strongly_typed=True", "an fp32 ONNX bundle",
                                 f"a strongly typed build keeps the ONNX's types; {export}"))
        return False, (requested.upper(),)
    raise InputError(fmt(f"--precision {requested}", f"a {onnx_precision} ONNX bundle",
                         f"an fp32 or {requested} bundle: {export}"))


def default_timing_cache(facts: dict[str, str]) -> Path:
    """Per-machine timing cache: ``$XDG_CACHE_HOME/nvembed_sdk/tensorrt/<trt>-<gpu>-sm<cc>.cache``.

    The cache only helps builds with the same TensorRT version and GPU, hence the key.
    """
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", facts["gpu_name"]).strip("-").lower()
    sm = facts["compute_capability"].replace(".", "")
    return root / "nvembed_sdk" / "tensorrt" / f"timing-{facts['version']}-{gpu}-sm{sm}.cache"


def _bundle(onnx_path: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    p = Path(onnx_path)
    if not p.exists():
        raise ArtifactError(fmt("ONNX bundle", f"{p} does not exist", "a bundle dir or its model.onnx"))
    directory = p if p.is_dir() else p.parent
    manifest = read_manifest(directory)
    if manifest.get("kind") != "onnx":
        raise ArtifactError(fmt(str(directory / MANIFEST), f"kind {manifest.get('kind')!r}",
                                "an ONNX bundle (kind 'onnx'): nvembed-export --to onnx"))
    model = p if p.is_file() else directory / str(manifest.get("files", {}).get("model", "model.onnx"))
    if not model.is_file():
        raise ArtifactError(fmt("ONNX bundle", f"{model} is missing", "the bundle's model.onnx"))
    for key in ("model", "text"):
        if not isinstance(manifest.get(key), dict):
            raise ArtifactError(fmt(str(directory / MANIFEST), f"no {key!r} section", "a bundle from nvembed-export"))
    return directory, model, manifest


def _as_profiles(profiles: str | Iterable[str] | Iterable[Profile] | None) -> list[Profile] | None:
    if profiles is None or isinstance(profiles, str):
        return parse_profiles(profiles)
    items = list(profiles)
    if not items:
        return None
    if all(isinstance(p, Profile) for p in items):
        return sort_profiles(items)  # type: ignore[arg-type]
    return parse_profiles([str(p) for p in items])


def build_engine(
    onnx_path: str | Path,
    output_dir: str | Path,
    precision: str,
    target: str = "datacenter",
    profiles: str | Iterable[str] | Iterable[Profile] | None = None,
    workspace_gb: float | None = None,
    opt_level: int = 3,
    timing_cache: str | Path | bool | None = None,
    strongly_typed: bool | None = None,
    device: str | None = None,
    verbose: bool = False,
) -> Path:
    """Build a TensorRT engine bundle from an ONNX bundle.

    Args:
        onnx_path: an ONNX bundle directory or its ``model.onnx`` (external data beside it).
        output_dir: the engine bundle directory (created; must differ from the ONNX bundle).
        precision: ``fp32``, ``fp16``, ``bf16``, ``int8`` or ``fp8`` (int8/fp8 need a Q/DQ bundle).
        target: ``datacenter``, ``jetson-orin`` or ``jetson-thor``. Defaults to datacenter.
        profiles: ``--profile`` strings (``MIN:OPT:MAX`` of ``BATCHxSEQ``) or :class:`Profile`s.
            Defaults to the target's length buckets. Seq ranges are clipped to the bundle's
            ``text.max_length``.
        workspace_gb: builder workspace limit in GiB. Defaults to the target's.
        opt_level: ``builder_optimization_level`` 0-5 (5: slowest build, sometimes faster
            engine). Defaults to 3.
        timing_cache: timing cache file to reuse and update. Defaults to a per-machine file
            (:func:`default_timing_cache`); False disables it.
        strongly_typed: force network typing (see :func:`plan_precision`). Defaults to None (auto).
        device: ``cuda`` or ``cuda:N``. Defaults to the current CUDA device.
        verbose: TensorRT's verbose log. Defaults to False.

    Returns:
        The engine bundle directory.

    Raises:
        InputError: impossible target/precision/GPU/profile combination.
        BackendUnavailableError: TensorRT or a CUDA GPU is missing (raised before any heavy work).
        ArtifactError: the ONNX bundle is missing or TensorRT cannot parse it.
        NVEmbedError: the build failed.
    """
    # Cheap, pure checks first: a request that can never work fails in milliseconds.
    t = check_target(target, precision)
    wanted = _as_profiles(profiles)
    if not (isinstance(opt_level, int) and 0 <= opt_level <= 5):
        raise InputError(fmt("opt_level", opt_level, "an int 0-5 (builder_optimization_level)"))
    workspace = float(workspace_gb if workspace_gb is not None else t.workspace_gb)
    if workspace <= 0:
        raise InputError(fmt("workspace_gb", workspace_gb, "a positive number of GiB"))
    src_dir, onnx_file, src = _bundle(onnx_path)
    out = Path(output_dir)
    if out.resolve() == src_dir.resolve():
        raise InputError(fmt("--output", str(out), "a directory other than the ONNX bundle it is built from"))
    onnx_precision = str(src.get("precision", "fp32"))
    max_length = int(src["text"].get("max_length") or 4096)
    chosen = fit_profiles(wanted or list(t.profiles), max_length)

    env = preflight(precision, target, device)  # tensorrt import, GPU, compute capability
    trt = env.trt
    typed, flags = plan_precision(precision, onnx_precision, env.trt_major, strongly_typed)
    if flags and precision in ("fp16", "bf16"):
        log.warning("weakly typed %s build from an fp32 ONNX: TensorRT picks each layer's precision; "
                    "an %s ONNX bundle (strongly typed) gives predictable numerics", precision.upper(), precision)

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    import torch

    with torch.cuda.device(env.device_index):
        builder = trt.Builder(logger)
        net_flags = 0
        # 10.x: NetworkDefinitionCreationFlag.STRONGLY_TYPED == 1 (EXPLICIT_BATCH == 0, deprecated and
        # ignored). 11.x: STRONGLY_TYPED == 0, deprecated and ignored (always on), and 1 is
        # PREFER_JIT_PYTHON_PLUGINS, so no flag is set there (include/NvInfer.h at v10.3.0, v11.1).
        if typed and env.trt_major < 11:
            net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(net_flags)
        parser = trt.OnnxParser(network, logger)
        # By path, so external data (model.onnx.data) resolves relative to the file.
        if not parser.parse_from_file(str(onnx_file)):
            raise ArtifactError(fmt(str(onnx_file), f"TensorRT {env.facts['version']} could not parse it: "
                                    + parser_errors(parser),
                                    f"an ONNX bundle exported at opset <= {t.opset_for(precision)} for {t.name}"))
        inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        outputs = [network.get_output(i).name for i in range(network.num_outputs)]
        if "input_ids" not in inputs or set(inputs) - set(INPUT_NAMES) or OUTPUT_NAME not in outputs:
            raise ArtifactError(fmt(str(onnx_file), f"inputs {inputs}, outputs {outputs}",
                                    f"inputs from {list(INPUT_NAMES)} (int64 [batch, seq]) and output {OUTPUT_NAME!r}"))

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace * (1 << 30)))
        config.builder_optimization_level = opt_level
        # Layer names and tactics in the plan, so fMHA fusion can be checked with the engine inspector.
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        for flag in flags:  # only on 10.x weakly typed builds (11.x has no precision BuilderFlags)
            config.set_flag(getattr(trt.BuilderFlag, flag))
        for p in chosen:
            prof = builder.create_optimization_profile()
            for name in inputs:  # every input is int64 [batch, seq]
                prof.set_shape(name, p.min, p.opt, p.max)  # raises RuntimeError on inconsistent shapes
            if config.add_optimization_profile(prof) < 0:  # the profile's index, or -1 if TensorRT rejects it
                raise TensorRTError(fmt("TensorRT add_optimization_profile", f"rejected {p.to_str()} (returned -1)",
                                        "MIN <= OPT <= MAX for every input (see the log above)"))

        cache, cache_path, rejected = (None, None, None)
        if timing_cache is not False:
            wanted_cache = Path(timing_cache) if timing_cache not in (None, True) else default_timing_cache(env.facts)
            cache, cache_path, rejected = _attach_timing_cache(config, wanted_cache, env.facts)

        log.info("building %s engine for %s on %s (TensorRT %s, %s, profiles %s)", precision, t.name,
                 env.facts["gpu_name"], env.facts["version"], "strongly typed" if typed else f"flags {flags}",
                 [p.to_str() for p in chosen])
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise NVEmbedError(fmt(
                "TensorRT build", f"failed for {precision} on {env.facts['gpu_name']} (see the TensorRT log above)",
                "a larger --workspace-gb, smaller --profile max shapes, or --verbose for details"))

        # Nothing lost, no half bundle: the plan goes to a temporary name in the bundle directory, the
        # tokenizer and the manifest (which records the plan's size, checked at load) follow, and
        # the plan is renamed into place last. A crash before that leaves the previous bundle (or
        # nothing) plus a stray temporary file; never a plan whose manifest describes another.
        cache_blob = _serialized(cache)  # the builder updated the attached cache in place
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{ENGINE_FILE}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(plan)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        size = tmp.stat().st_size
        del plan, config, parser, network, builder

    try:
        for name in TOKENIZER_FILES:
            if (src_dir / name).is_file() and (src_dir / name).resolve() != (out / name).resolve():
                part = out / f".{name}.{os.getpid()}.tmp"
                shutil.copy2(src_dir / name, part)
                part.replace(out / name)
        if not (out / "tokenizer.json").is_file():
            raise ArtifactError(fmt(str(src_dir), "no tokenizer.json", "an ONNX bundle with its tokenizer"))

        longest = max(p.max_seq for p in chosen)
        source = src.get("source", {}) if isinstance(src.get("source"), dict) else {}
        manifest = {
            "kind": "tensorrt",
            "precision": precision,
            "target": t.name,
            "files": {"model": ENGINE_FILE},
            "io": src.get("io", {"inputs": list(INPUT_NAMES), "outputs": [OUTPUT_NAME]}),
            "model": src["model"],
            # The engine cannot take more than its largest profile: the Embedder truncates to this.
            "text": {**src["text"], "max_length": min(max_length, longest)},
            "tensorrt": {
                **env.facts,  # version, cuda_major, gpu_name, compute_capability, platform: checked at load
                "profiles": [p.to_dict() for p in chosen],
                "strongly_typed": typed,
                "builder_flags": list(flags),
                "opt_level": opt_level,
                "workspace_gb": workspace,
                "timing_cache": str(cache_path) if cache_path else None,
                "timing_cache_rejected": str(rejected) if rejected else None,
                "plan_bytes": size,
                "plan_sha256": sha256_file(tmp),
            },
            "source": {
                "onnx": str(src_dir.resolve()),
                "onnx_sha256": sha256_file(onnx_file),
                "onnx_precision": onnx_precision,
                "opset": src.get("opset"),
                "checkpoint": source.get("checkpoint"),
                "checkpoint_sha256": source.get("sha256"),
            },
            "build": {"tool": "nvembed-sdk", "tensorrt": env.facts["version"], "torch": torch.__version__,
                      "seconds": round(time.perf_counter() - t0, 1)},
        }
        write_manifest(out, manifest)
        tmp.replace(out / ENGINE_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    if cache_path is not None and cache_blob:
        _save_timing_cache(cache_path, cache_blob)
    log.info("wrote %s (%.1f MB) in %.0f s", out / ENGINE_FILE, size / 1e6, time.perf_counter() - t0)
    return out


def parser_errors(parser: Any, shown: int = 3) -> str:
    """All of the ONNX parser's errors in one line: the count, then the first ``shown`` in full.

    Each error gives ``desc()``, the node index (``node()``, negative when the error is not tied
    to a node), ``node_name()``, ``node_operator()`` and ``local_function_stack()`` (the model-local
    functions the node sits in, outermost first): the ``IParserError`` bindings of TensorRT 10.3
    to 11.x (NVIDIA/TensorRT ``python/src/parsers/pyOnnx.cpp``).
    """
    n = int(parser.num_errors)
    if n <= 0:
        return "the parser recorded no error (see the TensorRT log above, or --verbose)"
    parts = []
    for i in range(min(n, shown)):
        err = parser.get_error(i)
        text = " ".join(str(err.desc()).split())
        where = []
        node = int(err.node())
        if node >= 0:
            where.append(f"node {node}")
        if err.node_name():
            where.append(repr(str(err.node_name())))
        if err.node_operator():
            where.append(f"op {err.node_operator()}")
        stack = [str(f) for f in err.local_function_stack()]
        if stack:
            where.append("in function " + " > ".join(stack))
        parts.append(f"[{i + 1}] {text}" + (f" ({', '.join(where)})" if where else ""))
    more = f"; {n - shown} more with --verbose" if n > shown else ""
    return f"{n} error{'s' if n != 1 else ''}: " + "; ".join(parts) + more


def _attach_timing_cache(config: Any, path: Path, facts: dict[str, Any]) -> tuple[Any, Path | None, Path | None]:
    """Attach the timing cache at ``path`` (or this machine's, or a fresh one) to ``config``.

    ``create_timing_cache`` returns None for bytes TensorRT cannot read, and
    ``set_timing_cache(cache, ignore_mismatch=False)`` returns False for a cache from another
    device ("A failure will be reported if the CUDA device property in the provided cache is
    different", ``IBuilderConfig::setTimingCache`` in NvInfer.h 10.3-11.1). Either way the build
    goes on, after one warning line, with this machine's default cache
    (:func:`default_timing_cache`) or a fresh one, which is saved there. A rejected file is
    never overwritten, unless it is that default path (keyed to this TensorRT and GPU).

    Returns:
        (the attached cache or None, where to save it after the build or None, the rejected path or None).
    """
    cache = _try_timing_cache(config, path.read_bytes() if path.is_file() else b"")
    if cache is not None:
        return cache, path, None
    default = default_timing_cache(facts)
    how = "rejected or unreadable" if path.is_file() else "unusable"
    fallback = _try_timing_cache(config, default.read_bytes()) if default != path and default.is_file() else None
    fresh = fallback is None
    if fresh:
        fallback = _try_timing_cache(config, b"")
    kept = "" if default == path else f", saved to {default}; {path} is left unchanged"
    log.warning("timing cache %s was %s by TensorRT %s on %s (made on another GPU or TensorRT build?); building "
                "with %s%s", path, how, facts["version"], facts["gpu_name"],
                "a fresh cache" if fresh else "this machine's cache", kept)
    if fallback is None:
        log.warning("TensorRT refused a fresh timing cache as well; building without one")
        return None, None, path
    return fallback, default, path


def _try_timing_cache(config: Any, blob: bytes) -> Any:
    try:
        cache = config.create_timing_cache(blob)
    except Exception:  # noqa: BLE001 - undocumented either way: treat a raise like the documented None
        return None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        return None
    return cache


def _serialized(cache: Any) -> bytes:
    if cache is None:
        return b""
    blob = cache.serialize()  # IHostMemory (buffer protocol)
    return bytes(memoryview(blob)) if blob is not None else b""


def _save_timing_cache(path: Path, blob: bytes) -> None:
    # After the bundle is complete: a cache that cannot be written costs the next build time, not this one.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        part.write_bytes(blob)
        part.replace(path)
    except OSError as exc:
        log.warning("could not save the timing cache to %s (%s); the engine bundle is complete", path, exc)
