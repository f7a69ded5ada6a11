"""Progress for long work: numbered phases with their time, and a bar (or steady lines) over items.

Exports and quantisation run for minutes in several steps (trace, calibrate, quantise, validate);
a user must see which step runs and that it advances. :class:`Phases` prints one line when a
phase starts and one when it ends, with its duration; :func:`progress` wraps an iterable with a
tqdm bar on a terminal and with a line every ``every`` seconds elsewhere (CI logs, pipes).

Example::

    phases = Phases("export int8", total=3)
    with phases.phase("trace to ONNX"):
        ...
    with phases.phase("calibrate (256 texts)"):
        for batch in progress(batches, "calibrate"):
            ...
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Phases:
    """Numbered phases of one long task, each logged on start and on end with its duration.

    Args:
        task: what the phases belong to, e.g. ``"export int8"``.
        total: number of phases, for ``[task 2/5]``. Defaults to None (no total shown).
        log: callable taking one line. Defaults to a write to stderr.
    """

    def __init__(self, task: str, total: int | None = None, log: Callable[[str], None] | None = None) -> None:
        self.task = task
        self.total = total
        self.log = log or _stderr
        self.done = 0
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        n = self.done + 1
        tag = f"[{self.task} {n}/{self.total}]" if self.total else f"[{self.task} {n}]"
        self.log(f"{tag} {name} ...")
        t = time.perf_counter()
        try:
            yield
        except BaseException:
            self.log(f"{tag} {name} failed after {time.perf_counter() - t:.1f}s")
            raise
        self.done = n
        self.log(f"{tag} {name} done in {time.perf_counter() - t:.1f}s")

    def finish(self, summary: str = "done") -> None:
        self.log(f"[{self.task}] {summary} in {time.perf_counter() - self.t0:.1f}s")


def progress(items: Iterable[T], desc: str, total: int | None = None, every: float = 10.0,
             log: Callable[[str], None] | None = None, tty: bool | None = None) -> Iterator[T]:
    """Yield ``items`` with progress: a tqdm bar on a terminal, else a line every ``every`` seconds.

    Args:
        items: the work items.
        desc: label, e.g. ``"calibrate"``.
        total: number of items. Defaults to ``len(items)`` when it has one.
        every: seconds between lines when not on a terminal. Defaults to 10.
        log: callable taking one line (non-terminal mode). Defaults to a write to stderr.
        tty: force the mode. Defaults to whether stderr is a terminal.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if tty if tty is not None else sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total)
        return
    out = log or _stderr
    t0 = last = time.perf_counter()
    n = 0
    for item in items:
        yield item
        n += 1
        now = time.perf_counter()
        if now - last >= every:
            last = now
            of = f"/{total}" if total else ""
            out(f"{desc}: {n}{of} ({now - t0:.0f}s)")
    out(f"{desc}: {n}{'/' + str(total) if total else ''} done ({time.perf_counter() - t0:.1f}s)")
