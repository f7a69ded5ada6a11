"""Typed checks for values read from files and options: each failure names the field.

Config files are JSON written by people: ``"hidden_size": 256.0``, ``"rope_theta": "ten
thousand"`` or ``"lr": "abc"`` must fail at load with the field's name, not later as a
``TypeError`` deep in torch. :func:`check_fields` checks a frozen dataclass's values against its
own annotations; :func:`check_options` checks backend options against a declared table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import typing
from collections.abc import Mapping
from typing import Any

from nvembed_sdk.errors import InputError, NVEmbedError, fmt

# Names the annotations of the checked dataclasses use, for typing.get_type_hints.
_NS = {"Any": Any}


def type_name(tp: Any) -> str:
    """A short human name of an annotation: ``int``, ``float or None``, ``list of str``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    names = {int: "an int", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis or (origin is list and args):
            return f"a list (each {type_name(args[0])})"
        return f"a list of {len(args)} values ({', '.join(type_name(a) for a in args)})" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def matches(value: Any, tp: Any) -> bool:
    """``value`` fits annotation ``tp`` (int is a float; bool is not a number)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return any(matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        args = typing.get_args(tp)
        if not args:
            return True
        if len(args) == 2 and args[1] is Ellipsis or origin is list:
            return all(matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict or tp is dict:
        return isinstance(value, Mapping)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]), localns=_NS)


def check_fields(obj: Any, where: str, error: type[NVEmbedError] = InputError) -> None:
    """Raise ``error`` naming the first field of dataclass ``obj`` whose value breaks its annotation."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = hints.get(f.name, Any)
        if not matches(value, tp):
            raise error(fmt(f"{where}{f.name}", f"{value!r:.60} ({type(value).__name__})", f"{type_name(tp)}"))


def check_range(where: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, error: type[NVEmbedError] = InputError) -> None:
    """Raise ``error`` unless ``lo <= value <= hi`` (``lo < value`` with ``lo_open``) and finite."""
    bad = isinstance(value, float) and not math.isfinite(value)
    if lo is not None:
        bad = bad or (value <= lo if lo_open else value < lo)
    if hi is not None:
        bad = bad or value > hi
    if bad:
        low = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        high = "" if hi is None else f"<= {hi}"
        raise error(fmt(where, repr(value), "must be " + " and ".join(s for s in (low, high) if s)))


# ---- backend options ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """One declared backend option: its type, allowed values and a line of help."""

    type: Any
    help: str = ""
    choices: tuple[Any, ...] = ()
    check: typing.Callable[[Any], bool] | None = None


def check_options(backend: str, declared: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """The options in ``given`` that are set (not None), each checked against ``declared``.

    Raises:
        InputError: an unknown option (the valid ones are listed) or a value of the wrong type
            or outside its choices.
    """
    valid = ", ".join(f"{k} ({type_name(o.type)})" for k, o in sorted(declared.items())) or "none"
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key not in declared:
            raise InputError(fmt(f"{backend} option", repr(key), f"valid options: {valid}"))
        if value is None:
            continue
        opt = declared[key]
        if not matches(value, opt.type) or (opt.check is not None and not opt.check(value)):
            raise InputError(fmt(f"{backend} option {key}", f"{value!r:.60} ({type(value).__name__})",
                                 f"{type_name(opt.type)}{'; ' + opt.help if opt.help else ''}"))
        if opt.choices and value not in opt.choices:
            raise InputError(fmt(f"{backend} option {key}", repr(value), f"one of {list(opt.choices)}"))
        out[key] = value
    return out


def check_device(device: object) -> None:
    """``None``, ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; anything else is an InputError."""
    if device is None:
        return
    ok = isinstance(device, str) and (device in ("auto", "cpu", "cuda") or (
        device.startswith("cuda:") and device[5:].isdigit()))
    if not ok:
        raise InputError(fmt("device", repr(device), "'cpu', 'cuda', 'cuda:N' or 'auto' (None picks CUDA if present)"))


# ---- export settings ------------------------------------------------------------------------

# ONNX opsets the exporter and ONNX Runtime both accept (torch.onnx's dynamo exporter targets 18+).
OPSET_RANGE = (17, 23)


def check_opset(opset: object) -> None:
    """Raise InputError for an opset outside :data:`OPSET_RANGE` (``--opset 99``)."""
    if opset is None:
        return
    lo, hi = OPSET_RANGE
    if not isinstance(opset, int) or isinstance(opset, bool) or not lo <= opset <= hi:
        raise InputError(fmt("--opset", repr(opset), f"an ONNX opset from {lo} to {hi} (default: per precision)"))


def check_export_sizes(max_length: object, calibration_size: object, model: object = None) -> None:
    """Refuse ``--max-length`` / ``--calibration-size`` values an export would record or ignore.

    ``--max-length -1`` was written into the manifest (a bundle that then failed to load), one
    above the model's positions silently clamped at load, and ``--calibration-size 0`` meant the
    default 256.

    Raises:
        InputError: a non-int, a max_length below 1 or above the checkpoint's
            ``max_position_embeddings``, or a calibration size below the minimum.
    """
    from pathlib import Path

    from nvembed_sdk.textsets import MIN_CALIBRATION_TEXTS

    for name, value, lo in (("--max-length", max_length, 1), ("--calibration-size", calibration_size,
                                                                 MIN_CALIBRATION_TEXTS)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise InputError(fmt(name, repr(value), f"an int >= {lo}" + (" (256 recommended)" if lo > 1 else "")))
    if max_length is None or model is None or not (Path(str(model)) / "config.json").is_file():
        return
    from nvembed_sdk.config import NVEmbedConfig

    positions = NVEmbedConfig.from_file(Path(str(model))).text.max_position_embeddings
    if max_length > positions:  # type: ignore[operator]
        raise InputError(fmt("--max-length", repr(max_length), f"at most the model's {positions} positions"))
