"""One exception family for the SDK.

Messages follow the template ``subject | what was received. Note: what was expected``
so that a one-line CLI error tells the user both the problem and the fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class NVEmbedError(Exception):
    """Base class of every error the SDK raises on purpose."""


class BackendUnavailableError(NVEmbedError, ImportError):
    """An optional backend package (onnxruntime, tensorrt, modelopt, CUDA) is missing."""


class ArtifactError(NVEmbedError, ValueError):
    """A path is missing, is not an artifact the SDK knows, or is corrupt or mismatched."""


class TensorRTError(NVEmbedError):
    """TensorRT refused a call whose result the SDK checks (an execution context, an
    optimisation profile, a tensor address or input shape, an enqueue)."""


class InputError(NVEmbedError, TypeError):
    """Bad input to ``embed`` (non-string items, impossible lengths, ...)."""


class ParityError(NVEmbedError):
    """Two artifacts disagree."""


class ShapeMismatch(ParityError):
    """The two sides returned arrays of different shapes."""


class ToleranceExceeded(ParityError):
    """The per-row cosine (or retrieval agreement) is outside the budget."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


def fmt(subject: str, received: object, expected: str) -> str:
    """Build a message in the house template."""
    return f"{subject} | got {received}. Note: {expected}"


# errno -> what the user can do about it (OSError messages carry the cause, not the fix).
_OS_FIXES = {
    "ENOSPC": "free disk space or write elsewhere",
    "EDQUOT": "free disk space (quota) or write elsewhere",
    "EROFS": "the file system is read-only; write to a writable location",
    "EACCES": "check the permissions, or write to a location you own",
    "EPERM": "check the permissions, or write to a location you own",
    "ENOTDIR": "a part of the path is a regular file, not a directory; choose another path",
    "ENOENT": "an existing path (check the spelling)",
    "EISDIR": "a file path, not a directory",
    "EFBIG": "the file is larger than this file system allows; write elsewhere",
    "EEXIST": "a path that does not exist yet, or remove the old one",
    "ENAMETOOLONG": "a shorter path",
}


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an error a user can cause, or None for a bug (keep its traceback).

    SDK errors carry their own message; OS errors (missing, read-only or full disks, a path
    under a regular file) and Unicode errors (undecodable files, lone surrogates) are put in
    the house template here, naming the file and the fix.
    """
    import errno as errno_mod

    if isinstance(exc, NVEmbedError):
        return str(exc)
    if isinstance(exc, OSError):
        code = errno_mod.errorcode.get(exc.errno or 0, "")
        # A failed write() carries no file name: it was writing an output (a file, or stdout).
        where = exc.filename if exc.filename is not None else "writing the output (a file or stdout)"
        return fmt(str(where), f"{exc.strerror or exc} ({code or type(exc).__name__})",
                   _OS_FIXES.get(code, "check the path, its permissions and the free disk space"))
    if isinstance(exc, UnicodeError):
        return fmt("text encoding", f"{type(exc).__name__}: {str(exc)[:200]}",
                   "UTF-8 text in files and arguments (no lone surrogates)")
    return None


class TrainingDiverged(NVEmbedError):
    """Training produced a non-finite loss, gradient or weight; the run stopped before saving it."""


class OutputError(NVEmbedError, OSError):
    """Writing an output failed on a full or read-only disk; the message names the output and the
    fix, and the writer removed what it had half written."""


# errnos that mean "this output cannot be written here" (not a bad input path): mapped by writing().
_WRITE_ERRNOS = ("ENOSPC", "EDQUOT", "EROFS", "EFBIG")


@contextlib.contextmanager
def writing(path: str | Path, what: str) -> Iterator[None]:
    """Turn a full or read-only disk while writing ``what`` at ``path`` into an :class:`OutputError`.

    A write that fails with ENOSPC carries no file name (the OSError comes from ``write``), so the
    one-line CLI error said only "file system"; this names the output. The caller removes its
    partial files (staging directories, temp files) before or while the error propagates.
    """
    import errno as errno_mod

    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        code = errno_mod.errorcode.get(exc.errno or 0, "")
        if code not in _WRITE_ERRNOS:
            raise
        err = OutputError(fmt(f"writing {what} {path}", f"{exc.strerror or exc} ({code})",
                              f"{_OS_FIXES.get(code, 'free disk space or write elsewhere')}; nothing half written "
                              "was kept, run the command again"))
        err.errno = exc.errno
        raise err from exc
