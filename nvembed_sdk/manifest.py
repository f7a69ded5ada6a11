"""``nvembed.json``: the manifest of an exported bundle (DESIGN.md "Bundle")."""

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


def read_manifest(directory: str | Path) -> dict[str, Any]:
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
    return data


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
