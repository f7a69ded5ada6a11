"""What a bundle's files must be: names resolved inside the bundle, sizes and sha256 recorded
in ``nvembed.json`` and checked at load, and a tokenizer whose ids fit the model's embedding.

``checksums`` in the manifest maps each file name (the model file, its external data, the
tokenizer files) to ``{"bytes": N, "sha256": HEX}``. :func:`write_manifest` fills it from the
files on disk, so every writer (ONNX, INT8/FP8, TensorRT, validation) records the files exactly
as they are when the manifest, the last file of an export, is written. Load always compares
sizes, always compares hashes of files under :data:`ALWAYS_HASH_BELOW` and hashes larger files
only with ``verify=True`` (sha256 ran at about 270 MB/s on a shared CPU here).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvembed_sdk.errors import ArtifactError, fmt
from nvembed_sdk.text import TOKENIZER_FILES

log = logging.getLogger("nvembed_sdk")

ALWAYS_HASH_BELOW = 2 * 1024**3  # bytes: files at least this large are hashed only on request
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REEXPORT = "re-export the bundle with nvembed-export (--overwrite replaces it)"

# (dev, inode, size, mtime_ns, ctime_ns) -> sha256: a file is hashed once per process unless it
# changes. ctime cannot be set by a user, so a copy that keeps the old mtime still re-hashes.
_HASHES: dict[tuple[int, int, int, int, int], str] = {}
_WARNED: set[str] = set()


def sha256_of(path: Path) -> str:
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def inside(directory: str | Path, name: object, field: str) -> Path:
    """``directory / name`` for a plain file name that stays in ``directory`` after symlinks.

    Raises:
        ArtifactError: an absolute path, a path with folders or ``..``, or a symlink leaving the bundle.
    """
    d = Path(directory)
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ArtifactError(fmt(f"{d / 'nvembed.json'} {field}", repr(name),
                                f"a plain file name inside the bundle (e.g. 'model.onnx'); {_REEXPORT}"))
    path = d / name
    if path.exists() and path.resolve().parent != d.resolve():
        raise ArtifactError(fmt(f"{path} ({field})", f"a link to {path.resolve()}, outside the bundle",
                                f"the bundle's own file; {_REEXPORT}"))
    return path


def model_file(directory: str | Path, manifest: Mapping[str, Any]) -> Path:
    """The bundle's model file (``files.model``), resolved inside the bundle."""
    files = manifest.get("files")
    if not isinstance(files, Mapping) or "model" not in files:
        raise ArtifactError(fmt(f"{Path(directory) / 'nvembed.json'}", "no files.model",
                                f"a manifest naming its model file; {_REEXPORT}"))
    return inside(directory, files["model"], "files.model")


def same_file(path: Path, expected: Path) -> None:
    if path.resolve() != expected.resolve():
        raise ArtifactError(fmt(str(path), f"not the model file of the bundle in {path.parent} ({expected.name})",
                                f"load the bundle directory or {expected}"))


def _recorded_names(directory: Path, manifest: Mapping[str, Any]) -> list[str]:
    files = manifest.get("files") if isinstance(manifest.get("files"), Mapping) else {}
    names = [str(inside(directory, v, f"files.{k}").name) for k, v in files.items()]
    names += [n for n in TOKENIZER_FILES if (directory / n).is_file() and n not in names]
    return names


def file_records(directory: str | Path, manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` for the model file(s) named in ``files`` and the tokenizer files."""
    d = Path(directory)
    out: dict[str, dict[str, Any]] = {}
    for name in _recorded_names(d, manifest):
        path = d / name
        if not path.is_file():
            raise ArtifactError(fmt(str(path), "missing while writing the manifest", "the exporter writes it first"))
        out[name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    return out


def verify_files(directory: str | Path, manifest: Mapping[str, Any], full: bool = False) -> None:
    """Check every recorded file's size, and its sha256 when under 2 GB or ``full``.

    A manifest of format version 1 (written before checksums existed) loads with one warning
    per bundle; from version 2 a manifest without checksums is refused.

    Raises:
        ArtifactError: a missing, resized, changed or unrecorded file, naming it.
    """
    d = Path(directory)
    where = str(d / "nvembed.json")
    records = manifest.get("checksums")
    if records is None and manifest.get("format_version") == 1:
        if where not in _WARNED:
            _WARNED.add(where)
            log.warning("%s predates file checksums (format_version 1): its files are NOT verified; "
                        "re-export it to add them", where)
        return
    if not isinstance(records, Mapping) or not records:
        raise ArtifactError(fmt(where, "no checksums", f"a manifest recording its files' sizes and sha256; {_REEXPORT}"))
    for name in _recorded_names(d, manifest):
        if name not in records:
            raise ArtifactError(fmt(str(d / name), "not recorded in the manifest's checksums",
                                    f"only the files the exporter wrote; {_REEXPORT}"))
    for name, rec in records.items():
        path = inside(d, name, f"checksums[{name!r}]")
        if not (isinstance(rec, Mapping) and isinstance(rec.get("bytes"), int)
                and isinstance(rec.get("sha256"), str) and _HEX64.match(rec["sha256"])):
            raise ArtifactError(fmt(where, f"checksums[{name!r}] = {rec!r:.80}", "{'bytes': int, 'sha256': hex}"))
        if not path.is_file():
            raise ArtifactError(fmt(str(path), "missing", f"the file the manifest records; {_REEXPORT}"))
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise ArtifactError(fmt(str(path), f"{size:,} bytes, the manifest records {rec['bytes']:,}",
                                    f"the file as exported (truncated or replaced?); {_REEXPORT}"))
        if (size < ALWAYS_HASH_BELOW or full) and sha256_of(path) != rec["sha256"]:
            raise ArtifactError(fmt(str(path), f"sha256 {sha256_of(path)[:16]}..., the manifest records "
                                    f"{rec['sha256'][:16]}...", f"the file as exported (changed or swapped); {_REEXPORT}"))
    if full:
        log.info("verified %d files of %s (sizes and sha256)", len(records), d)


def model_vocab_size(kind: str, directory: str | Path, manifest: Mapping[str, Any] | None) -> int | None:
    """Rows of the model's token embedding: the checkpoint's config, else the bundle's manifest."""
    if kind == "torch":
        from nvembed_sdk.config import NVEmbedConfig

        return int(NVEmbedConfig.from_file(directory).text.vocab_size)
    vocab = ((manifest or {}).get("model") or {}).get("vocab_size")
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def check_token_range(directory: str | Path, vocab_size: int | None) -> None:
    """Refuse a tokenizer that can emit ids the model's embedding (``vocab_size`` rows) lacks.

    Without this, such a pair raises a raw IndexError on some texts and silently embeds others.

    Raises:
        ArtifactError: the tokenizer's ids reach past the embedding.
    """
    if vocab_size is None:
        return  # nothing recorded to compare with (a bare model.onnx)
    from nvembed_sdk.text import TextPipeline

    vocab = TextPipeline(directory).tokenizer.get_vocab(with_added_tokens=True)
    bound = 1 + max(vocab.values(), default=-1)
    if bound > vocab_size:
        raise ArtifactError(fmt(f"{Path(directory) / 'tokenizer.json'}", f"token ids up to {bound - 1}, but the "
                                f"model's embedding has {vocab_size:,} rows (ids 0..{vocab_size - 1})",
                                "the tokenizer the model was trained with"))
