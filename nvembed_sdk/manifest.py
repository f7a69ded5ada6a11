"""``nvembed.json``: the manifest of an exported bundle (README "Export and deployment")."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nvembed_sdk.errors import ArtifactError, fmt

MANIFEST = "nvembed.json"
FORMAT_VERSION = 2  # 2: "checksums" (size + sha256 of every file, nvembed_sdk/bundle_files.py)
READABLE_VERSIONS = (1, 2)  # 1 loads with a warning: its files cannot be verified
INPUT_NAMES = ("input_ids", "attention_mask", "pool_mask")
OUTPUT_NAME = "embeddings"
POOL_RULE = "nv-embed-v2: zero positions [0, len(tokenize(instruction))) of the attention mask"


def read_manifest(directory: str | Path, check_types: bool = True) -> dict[str, Any]:
    """A bundle's manifest; with ``check_types`` (default) a field of the wrong type (``"dim":
    "big"``) is an ArtifactError naming it, for every reader (``nvembed info`` printed it)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(fmt(str(directory), f"no {MANIFEST}", "a bundle written by nvembed-export"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(fmt(str(path), f"invalid JSON ({exc})", "a manifest written by nvembed-export")) from exc
    if not isinstance(data, dict) or data.get("format_version") not in READABLE_VERSIONS:
        got = data.get("format_version") if isinstance(data, dict) else type(data).__name__
        raise ArtifactError(fmt(str(path), f"format_version {got}",
                                f"format_version {FORMAT_VERSION}; re-export with this nvembed-sdk"))
    return check_manifest_types(data, path) if check_types else data


def write_manifest(directory: str | Path, data: dict[str, Any]) -> Path:
    from nvembed_sdk.bundle_files import file_records

    path = Path(directory) / MANIFEST
    data = {k: v for k, v in data.items() if k not in ("format_version", "checksums")}
    # The files as they are now: the manifest is the last file an export writes.
    data = {"format_version": FORMAT_VERSION, **data, "checksums": file_records(directory, data)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_hash(directory: str | Path) -> str:
    """sha256 over config.json and the safetensors files of a checkpoint (names + bytes)."""
    d = Path(directory)
    h = hashlib.sha256()
    for f in sorted([d / "config.json", *d.glob("*.safetensors")]):
        if f.is_file():
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


# Typed manifest fields: (section, key) -> (type, minimum). A hand-edited ``"dim": "big"`` must be
# an ArtifactError naming the field, not a ValueError from int().
_TYPED_FIELDS: dict[tuple[str, str], tuple[type | tuple[type, ...], int | None]] = {
    ("model", "dim"): (int, 1),
    ("model", "num_parameters"): (int, 1),
    ("model", "num_hidden_layers"): (int, 1),
    ("model", "hidden_size"): (int, 1),
    ("model", "vocab_size"): (int, 1),
    ("model", "max_position_embeddings"): (int, 1),
    ("text", "max_length"): (int, 1),
    ("text", "pad_id"): (int, 0),
    ("text", "eos_token"): (str, None),
    ("text", "mask_instruction"): (bool, None),
    ("files", "model"): (str, None),
    ("", "precision"): (str, None),
    ("", "kind"): (str, None),
}


def check_manifest_types(data: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """Raise ArtifactError naming the first manifest field of the wrong type or below its minimum."""
    for (section, key), (tp, minimum) in _TYPED_FIELDS.items():
        holder = data if not section else data.get(section, {})
        if not isinstance(holder, dict):
            raise ArtifactError(fmt(f"{where} {section}", f"a {type(holder).__name__}", "a JSON object"))
        if key not in holder or holder[key] is None:
            continue
        value = holder[key]
        ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
        if ok and minimum is not None and value < minimum:
            ok = False
        if not ok:
            name = f"{section}.{key}" if section else key
            need = getattr(tp, "__name__", str(tp)) + (f" >= {minimum}" if minimum is not None else "")
            article = "an" if need[0] in "aeiou" else "a"
            raise ArtifactError(fmt(f"{where} {name}", f"{value!r:.60}", f"{article} {need}; re-export the bundle"))
    return data
