"""Deployment targets for TensorRT engines and the ``--profile`` syntax.

A target fixes what an engine build may assume about the machine it will run on:

* ``datacenter``: L4/L40S (SM 8.9), H100/H200 (SM 9.0), any CUDA GPU for fp32/fp16/int8;
  all precisions (FP8 needs SM >= 8.9, checked on the build GPU); 8 GiB workspace;
  ONNX opset 20 (21 for FP8 Q/DQ); profiles up to 8 x 4096 tokens.
* ``jetson-orin``: Orin (SM 8.7), JetPack 6 -> TensorRT 10.3; fp32/fp16/bf16/int8, **no FP8**;
  2 GiB workspace (the GPU shares DRAM with the CPU); opset <= 20; profiles up to 2 x 2048.
* ``jetson-thor``: Thor (Blackwell), JetPack 7; all precisions; 4 GiB workspace; opset 20
  (21 for FP8 Q/DQ); profiles up to 4 x 4096.

Jetson engines are built on the device (plans are not portable across GPUs, platforms or
TensorRT versions).

Everything here is pure Python and instant: the CLI calls :func:`check_target` before it
imports TensorRT or exports anything, so a request that can never work fails in milliseconds.

Profile syntax (one ``--profile`` per optimisation profile, or several joined by commas)::

    MIN:OPT:MAX   each BATCHxSEQ, e.g.  1x16:8x128:32x512
    MAX           shorthand for 1x1:MAX:MAX, e.g.  32x512
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from nvembed_sdk.errors import InputError, fmt

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
# Q/DQ precisions: the ONNX must already carry QuantizeLinear/DequantizeLinear (ModelOpt); TensorRT
# 11 has no implicit calibration and 10.x only has it deprecated, so the builder never calibrates.
QDQ_PRECISIONS = ("int8", "fp8")
# FP8 tensor cores arrive with Ada (SM 8.9: L4, L40S) and Hopper (SM 9.0); BF16 with Ampere (SM 8.0).
MIN_COMPUTE_CAPABILITY = {"fp8": (8, 9), "bf16": (8, 0)}

_SHAPE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile over ``(batch, seq)`` for every input.

    Attributes:
        min: smallest (batch, seq) the profile accepts.
        opt: the (batch, seq) TensorRT tunes kernels for.
        max: largest (batch, seq); activation memory grows with ``max`` batch x seq.
    """

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def __post_init__(self) -> None:
        for label, shape in (("min", self.min), ("opt", self.opt), ("max", self.max)):
            if len(shape) != 2 or any(int(v) < 1 for v in shape):
                raise InputError(fmt(f"profile {label}", shape, "two positive ints (batch, seq)"))
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max, strict=True)):
            raise InputError(fmt("profile", self.to_str(), "min <= opt <= max for batch and for seq"))

    @property
    def max_batch(self) -> int:
        return self.max[0]

    @property
    def max_seq(self) -> int:
        return self.max[1]

    def to_str(self) -> str:
        """The ``--profile`` spelling, e.g. ``1x16:8x128:32x512``."""
        return ":".join(f"{b}x{s}" for b, s in (self.min, self.opt, self.max))

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        try:
            return cls(*(tuple(int(v) for v in d[k]) for k in ("min", "opt", "max")))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(fmt("profile", repr(d), "{'min': [B, S], 'opt': [B, S], 'max': [B, S]}")) from exc

    def cap_seq(self, max_seq: int) -> Profile:
        """The same profile with every seq bound clipped to ``max_seq``."""
        return Profile(*((b, min(s, max_seq)) for b, s in (self.min, self.opt, self.max)))  # type: ignore[arg-type]


def _shape(text: str, spec: str) -> tuple[int, int]:
    m = _SHAPE.match(text)
    if not m:
        raise InputError(fmt("--profile", repr(spec),
                             "MIN:OPT:MAX with each BATCHxSEQ, e.g. 1x16:8x128:32x512, or just MAX, e.g. 32x512"))
    return int(m.group(1)), int(m.group(2))


def parse_profile(spec: str) -> Profile:
    """Parse one profile: ``"1x16:8x128:32x512"`` (min:opt:max) or ``"32x512"`` (= ``1x1:32x512:32x512``).

    Args:
        spec: the profile string.

    Returns:
        The :class:`Profile`.

    Raises:
        InputError: bad syntax, a zero dimension, or min > opt > max.
    """
    parts = spec.strip().split(":")
    if len(parts) == 1:
        top = _shape(parts[0], spec)
        return Profile((1, 1), top, top)
    if len(parts) != 3:
        raise InputError(fmt("--profile", repr(spec), "three BATCHxSEQ parts MIN:OPT:MAX, e.g. 1x16:8x128:32x512"))
    lo, opt, hi = (_shape(p, spec) for p in parts)
    return Profile(lo, opt, hi)


def parse_profiles(specs: str | Iterable[str] | None) -> list[Profile] | None:
    """Parse several profiles (a list, or one string with comma-separated profiles).

    Returns:
        The profiles sorted by max seq then max batch, or None when ``specs`` is empty
        (meaning: use the target's defaults).
    """
    if specs is None:
        return None
    if isinstance(specs, str):
        specs = [specs]
    items = [s for spec in specs for s in spec.split(",") if s.strip()]
    if not items:
        return None
    return sort_profiles(parse_profile(s) for s in items)


def sort_profiles(profiles: Iterable[Profile]) -> list[Profile]:
    out: list[Profile] = []
    for p in sorted(profiles, key=lambda p: (p.max_seq, p.max_batch)):
        if p not in out:
            out.append(p)
    return out


def fit_profiles(profiles: Sequence[Profile], max_length: int) -> list[Profile]:
    """Drop seq ranges the model can never see.

    Keeps every profile whose max seq is <= ``max_length``; if none reaches ``max_length``,
    the next longer profile is kept with its seq clipped to ``max_length`` (so the engine
    still covers the model's whole length). The engine bundle's ``text.max_length`` is then
    ``min(max_length, largest max seq)``.
    """
    if max_length < 1:
        raise InputError(fmt("max_length", max_length, "an int >= 1"))
    ordered = sort_profiles(profiles)
    keep = [p for p in ordered if p.max_seq <= max_length]
    longer = [p for p in ordered if p.max_seq > max_length]
    if longer and not any(p.max_seq == max_length for p in keep):
        keep.append(longer[0].cap_seq(max_length))
    return sort_profiles(keep)


@dataclass(frozen=True)
class Target:
    """Defaults for one deployment target (see the module docstring).

    Attributes:
        name: ``datacenter``, ``jetson-orin`` or ``jetson-thor``.
        description: one line for ``--help`` and errors.
        precisions: precisions an engine may be built in.
        workspace_gb: builder workspace limit (GiB). On Jetson the GPU shares DRAM with the CPU.
        profiles: default optimisation profiles, bucketed by sequence length.
        opset: ONNX opset to export at for fp32/fp16/bf16/int8.
        fp8_opset: ONNX opset to export FP8 Q/DQ at (None: no FP8).
        on_device: engines must be built on the device itself (aarch64 Jetson).
        compute_capability: the SM the target's GPU has, when it has one fixed value.
    """

    name: str
    description: str
    precisions: tuple[str, ...]
    workspace_gb: float
    profiles: tuple[Profile, ...]
    opset: int
    fp8_opset: int | None
    on_device: bool
    compute_capability: tuple[int, int] | None = None

    def opset_for(self, precision: str) -> int:
        """ONNX opset to export at for this precision (FP8 Q/DQ goes to >= 21)."""
        if precision == "fp8" and self.fp8_opset is not None:
            return self.fp8_opset
        return self.opset


def _profiles(*specs: str) -> tuple[Profile, ...]:
    return tuple(parse_profile(s) for s in specs)


TARGETS: dict[str, Target] = {
    # 80-141 GB HBM: wide buckets; 8x4096 tokens of a 7B model stay well inside one H100.
    "datacenter": Target(
        name="datacenter",
        description="datacenter GPU (L4/L40S SM 8.9, H100/H200 SM 9.0; FP8 needs SM >= 8.9)",
        precisions=PRECISIONS,
        workspace_gb=8.0,
        profiles=_profiles("1x1:32x128:128x128", "1x1:16x512:64x512", "1x1:2x4096:8x4096"),
        opset=20,
        fp8_opset=21,
        on_device=False,
    ),
    # 16-64 GB shared DRAM holds a 7B INT8 (~7.5 GB) or FP16 (~14.5 GB) engine plus the OS; keep
    # activation memory small (max 8x512 or 2x2048 tokens) and stop at 2048 tokens.
    # Opset <= 20: TensorRT 10.3 (JetPack 6) predates opset-23 Attention/RMSNormalization.
    "jetson-orin": Target(
        name="jetson-orin",
        description="Jetson AGX Orin / Orin NX / Orin Nano (SM 8.7, JetPack 6 -> TensorRT 10.3)",
        precisions=("fp32", "fp16", "bf16", "int8"),
        workspace_gb=2.0,
        profiles=_profiles("1x1:8x128:32x128", "1x1:2x512:8x512", "1x1:1x2048:2x2048"),
        opset=20,
        fp8_opset=None,
        on_device=True,
        compute_capability=(8, 7),
    ),
    # 128 GB unified memory, Blackwell: FP8 (and later NVFP4) tensor cores.
    "jetson-thor": Target(
        name="jetson-thor",
        description="Jetson AGX Thor (Blackwell, JetPack 7; FP8 supported)",
        precisions=PRECISIONS,
        workspace_gb=4.0,
        profiles=_profiles("1x1:16x128:64x128", "1x1:8x512:32x512", "1x1:1x4096:4x4096"),
        opset=20,
        fp8_opset=21,
        on_device=True,
    ),
}


def get_target(name: str) -> Target:
    """The :class:`Target` called ``name``.

    Raises:
        InputError: unknown target.
    """
    try:
        return TARGETS[name]
    except KeyError:
        raise InputError(fmt("--target", repr(name), f"one of {', '.join(TARGETS)}")) from None


def check_target(target: str, precision: str) -> Target:
    """Fail at once when ``precision`` can never be built for ``target`` (no TensorRT needed).

    Args:
        target: ``datacenter``, ``jetson-orin`` or ``jetson-thor``.
        precision: ``fp32``, ``fp16``, ``bf16``, ``int8`` or ``fp8``.

    Returns:
        The target.

    Raises:
        InputError: unknown target or precision, or a precision the target's hardware lacks
            (FP8 on Jetson Orin names the INT8 and FP16 alternatives).
    """
    t = get_target(target)
    if precision not in PRECISIONS:
        raise InputError(fmt("--precision", repr(precision), f"one of {', '.join(PRECISIONS)}"))
    if precision not in t.precisions:
        if precision == "fp8":
            cc = ".".join(map(str, t.compute_capability)) if t.compute_capability else "?"
            raise InputError(fmt(
                f"--precision fp8 --target {t.name}", f"FP8 on {t.description}",
                f"{t.name} (compute capability {cc}) has no FP8 tensor cores (FP8 needs >= 8.9); "
                "use --precision int8 (INT8 Q/DQ, smallest and fastest) or --precision fp16 (FP16, most accurate)"))
        raise InputError(fmt(f"--precision {precision} --target {t.name}", "unsupported",
                             f"one of {', '.join(t.precisions)}"))
    return t


def check_compute_capability(precision: str, capability: tuple[int, int], gpu_name: str = "this GPU") -> None:
    """Fail when the GPU that will build (and run) the engine lacks ``precision``.

    Args:
        precision: the engine precision.
        capability: (major, minor) compute capability of the build GPU.
        gpu_name: the GPU's name, for the message.

    Raises:
        InputError: FP8 below SM 8.9, BF16 below SM 8.0.
    """
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    if need is not None and tuple(capability) < need:
        have = f"{capability[0]}.{capability[1]}"
        alt = "int8 or fp16" if precision == "fp8" else "fp16"
        raise InputError(fmt(
            f"--precision {precision}", f"{gpu_name} with compute capability {have}",
            f"{precision.upper()} needs compute capability >= {need[0]}.{need[1]} "
            f"({'L4, L40S, H100, H200, Jetson Thor' if precision == 'fp8' else 'Ampere or newer'}); "
            f"use --precision {alt} on this GPU"))


def check_build_host(target: Target, machine: str) -> None:
    """Jetson engines must be built on the Jetson: plans are not portable across platforms.

    Args:
        target: the target.
        machine: ``platform.machine()`` of the build host.

    Raises:
        InputError: a Jetson target built on a non-aarch64 host.
    """
    if target.on_device and machine.lower() not in ("aarch64", "arm64"):
        raise InputError(fmt(
            f"--target {target.name}", f"a {machine} build host",
            "TensorRT engines are tied to the GPU, platform and TensorRT version that built them; "
            "copy the ONNX bundle to the Jetson and run nvembed-export there "
            "(JetPack provides TensorRT)"))
