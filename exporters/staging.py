"""Staged exports: a bundle appears at its target only complete, validated and whole.

An export writes into ``.<name>.staging-XXXX`` beside the target (same filesystem), runs its
validation there (the manifest, written last, names every file with its size and sha256), and
only then is the directory renamed into place. A kill at any point leaves either no bundle or
the previous one:

* a new target: one ``rename(staging, target)``;
* ``overwrite=True`` over an existing bundle: the two directories are swapped with one atomic
  ``renameat2(RENAME_EXCHANGE)`` (Linux), then the old one is deleted. Where the exchange is not
  available, the old bundle is renamed aside to ``.<name>.old-XXXX`` first and the next export
  to that target puts it back if the kill fell between the two renames.

A lock on ``.<name>.lock`` (``fcntl.flock``, released by the kernel when the process dies) makes
a second concurrent export to the same target fail at once. A target that holds anything other
than a bundle of this SDK is refused, so an export never deletes a user's files.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from nvembed_sdk.errors import ArtifactError, InputError, fmt, writing
from nvembed_sdk.integrations.st_files import ST_FILES
from nvembed_sdk.manifest import MANIFEST, read_manifest
from nvembed_sdk.output import OUTPUT_FILE
from nvembed_sdk.text import TOKENIZER_FILES

F = TypeVar("F", bound=Callable[..., Any])

# Staging directories of exports running in this process: an export called by another one
# (quantize -> onnx, the TensorRT CLI -> onnx + engine) writes straight into the outer staging.
_ACTIVE: dict[Path, Path] = {}  # staging directory -> final target
_BUNDLE_KINDS = ("onnx", "tensorrt")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _hidden(target: Path, what: str) -> str:
    return f".{target.name}.{what}"


def _within_active(target: Path) -> bool:
    t = target.resolve()
    return any(t == s or s in t.parents for s in _ACTIVE)


def final_path(path: str | Path) -> Path:
    """Where ``path`` (inside a staging directory of this process) will be once the export completes.

    For messages and manifest fields that name a bundle: they should name the target, not the
    staging directory that disappears.
    """
    p = Path(path).resolve()
    for stage, target in _ACTIVE.items():
        if p == stage or stage in p.parents:
            return target / p.relative_to(stage)
    return Path(path)


def is_bundle(path: Path) -> bool:
    """A directory holding an ``nvembed.json`` of an ONNX or TensorRT bundle (any format version)."""
    try:
        # Types unchecked: a bundle with a hand-broken field is still ours to replace (--overwrite).
        return path.is_dir() and read_manifest(path, check_types=False).get("kind") in _BUNDLE_KINDS
    except ArtifactError:
        return False


def _foreign_entries(bundle: Path) -> list[str]:
    """Entries of a bundle directory that its exporter did not write (they would be deleted)."""
    m = read_manifest(bundle, check_types=False)
    own = {MANIFEST, *TOKENIZER_FILES, *ST_FILES, OUTPUT_FILE, "onnx",
           *(str(v) for v in (m.get("files") or {}).values())}
    return sorted(e.name for e in bundle.iterdir() if e.name not in own)


def check_target(target: str | Path, overwrite: bool = False) -> None:
    """Refuse a target that an export must not replace (before any slow work).

    Raises:
        ArtifactError: a file, a non-empty directory that is not a bundle of this SDK, a bundle
            holding other files, or a bundle without ``overwrite``.
    """
    t = Path(target)
    if not t.exists() and not t.is_symlink():
        # A path under a regular file (out.txt/bundle) would fail at mkdir with a misleading EEXIST.
        above = next((p for p in t.absolute().parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise ArtifactError(fmt(f"output {t}", f"{above} is a regular file, not a directory",
                                    "an --output whose parent folders are directories (or do not exist yet)"))
        return
    if not t.is_dir() or t.is_symlink():
        raise ArtifactError(fmt(f"output {t}", "an existing file or link, not a directory",
                                "a new or empty directory for the bundle"))
    entries = sorted(e.name for e in t.iterdir())
    if not entries:
        return
    if not is_bundle(t):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ArtifactError(fmt(f"output {t}", f"a non-empty directory that is not an nvembed bundle ({shown})",
                                "a new or empty directory; nothing there is deleted or overwritten"))
    foreign = _foreign_entries(t)
    if foreign:
        raise ArtifactError(fmt(f"output {t}", f"a bundle that also holds {', '.join(foreign[:5])}",
                                "move those files out first (--overwrite replaces the whole directory)"))
    if not overwrite:
        raise ArtifactError(fmt(f"output {t}", "already holds a bundle",
                                "pass --overwrite (overwrite=True) to replace it, or choose another --output"))


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
    import fcntl

    path = target.parent / _hidden(target, "lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArtifactError(fmt(f"output {target}", f"another export is writing it (lock {path} is held)",
                                    "wait for that export to finish, or choose another --output")) from None
        # The holder before us may have unlinked the file after we opened it: lock the live one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)  # closing releases the flock


def _recover(target: Path) -> None:
    """Under the lock: undo a swap cut between its two renames, drop leftovers of killed exports."""
    entries = list(target.parent.iterdir())  # not glob: a target name may hold [ or *
    olds = sorted((e for e in entries if e.name.startswith(_hidden(target, "old-"))),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    if olds and not target.exists() and is_bundle(olds[0]):
        os.rename(olds[0], target)  # the previous bundle, unchanged
        olds = olds[1:]
    stages = [e for e in entries if e.name.startswith(_hidden(target, "staging-"))]
    for leftover in [*olds, *stages]:
        shutil.rmtree(leftover, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _commit(stage: Path, target: Path) -> None:
    if not target.exists():
        os.rename(stage, target)
        return
    if not any(target.iterdir()):
        os.rmdir(target)
        os.rename(stage, target)
        return
    # Replacing a bundle (check_target ran again just before).
    if _exchange(stage, target):
        shutil.rmtree(stage)  # now holds the previous bundle
        return
    old = _rename_aside(target)
    os.rename(stage, target)  # a kill between the two renames: _recover puts `old` back
    shutil.rmtree(old, ignore_errors=True)


def _rename_aside(target: Path) -> Path:
    old = Path(tempfile.mkdtemp(prefix=_hidden(target, "old-"), dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    return old


@contextlib.contextmanager
def staged_output(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory for a bundle and move it to ``target`` when the block succeeds.

    Inside another staged export of this process (a nested step) the target is used directly.
    The bundle is checked before it is moved: its manifest must exist and every recorded file
    must match its size and sha256.

    Args:
        target: the bundle directory to create or replace.
        overwrite: replace an existing bundle of this SDK. Defaults to False.

    Raises:
        ArtifactError: the target is refused (:func:`check_target`), another export holds it,
            or the staged bundle is incomplete.
    """
    t = Path(target)
    if _within_active(t):
        t.mkdir(parents=True, exist_ok=True)
        yield t
        return
    t = t.absolute()
    check_target(t, overwrite)
    # A full or read-only disk: one line naming the bundle (the staging directory is removed below).
    with writing(t, "bundle"):
        t.parent.mkdir(parents=True, exist_ok=True)
        with _locked_stage(t, overwrite) as stage:
            yield stage


@contextlib.contextmanager
def _locked_stage(t: Path, overwrite: bool) -> Iterator[Path]:
    with _lock(t):
        _recover(t)
        check_target(t, overwrite)
        stage = Path(tempfile.mkdtemp(prefix=_hidden(t, "staging-"), dir=t.parent)).resolve()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would become the bundle's mode
        _ACTIVE[stage] = t
        try:
            yield stage
            _check_complete(stage)
            check_target(t, overwrite)  # nothing else may have appeared there meanwhile
            _commit(stage, t)
        finally:
            _ACTIVE.pop(stage, None)
            shutil.rmtree(stage, ignore_errors=True)


def _check_complete(stage: Path) -> None:
    from nvembed_sdk.bundle_files import model_file, verify_files

    if not (stage / MANIFEST).is_file():
        raise ArtifactError(fmt(f"staged bundle {stage}", f"no {MANIFEST}", "the exporter writes the manifest last"))
    m = read_manifest(stage)
    model_file(stage, m)
    verify_files(stage, m, full=True)


def staged(output_arg: str, inputs: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorate an exporter so it writes ``output_arg`` through :func:`staged_output`.

    The decorated function takes an extra keyword ``overwrite`` (default False) and returns the
    final target path wherever it returned its output directory. ``inputs`` name the arguments
    that are read from: the target may not be (or hold) one of them.
    """

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)
        if output_arg not in sig.parameters:
            raise TypeError(f"{fn.__name__} has no parameter {output_arg!r}")

        @functools.wraps(fn)
        def run(*args: Any, overwrite: bool = False, **kwargs: Any) -> Any:
            if not isinstance(overwrite, bool):
                raise InputError(fmt("overwrite", repr(overwrite), "True or False"))
            bound = sig.bind(*args, **kwargs)
            target = Path(bound.arguments[output_arg])
            for name in inputs if not _within_active(target) else ():
                src = Path(bound.arguments[name]).resolve() if name in bound.arguments else None
                if src is not None and (src == target.resolve() or target.resolve() in src.parents):
                    raise InputError(fmt(f"output {target}", f"the {name} it is built from",
                                         "a directory other than the ONNX bundle it is built from"))
            with staged_output(target, overwrite=overwrite) as stage:
                bound.arguments[output_arg] = stage
                result = fn(*bound.args, **bound.kwargs)
            return target if isinstance(result, Path) and result == stage and stage != target else result

        return run  # type: ignore[return-value]

    return wrap
