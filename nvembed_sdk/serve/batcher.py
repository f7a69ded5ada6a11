"""Admission by queued tokens, token-budget packing and the one model worker thread.

No web imports: the app (or any host) calls :meth:`Batcher.submit` on its event loop and awaits
the returned future. Three parties:

* the event loop admits a request (``submit``): its rows' tokens count against
  ``max_queue_tokens`` until they are embedded; over the limit it raises :class:`QueueFull`;
* the packer thread sorts the waiting rows by length and takes the run that wastes the fewest
  padded tokens under ``max_batch_tokens`` (rows x longest) and ``max_batch_requests`` rows,
  except that the oldest row goes once it has been passed over ``patience`` times (nothing
  starves); it collates them (right padding) and hands the batch over; it packs when the
  worker goes idle, or while the current pass runs once four batches' worth wait (a
  hand-over queue of one);
* the worker thread runs the model (CUDA and TensorRT contexts stay on this one thread),
  normalises, writes each row into its request's output in the request's order, and resolves the
  request's future on the event loop once all its rows are done (a big request spans batches).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from nvembed_sdk.text import Batch

log = logging.getLogger("nvembed_sdk.serve")


class QueueFull(Exception):
    """Admitting the request would put the queue over ``max_queue_tokens``."""


class TooLarge(Exception):
    """The request alone holds more tokens than ``max_queue_tokens``: it can never be admitted."""


class Closed(Exception):
    """The batcher is draining or stopped: no new work."""


@dataclass
class Job:
    """One admitted request: its rows, its output (N, D) in input order, and the future to resolve."""

    rows: list[list[int]]
    starts: list[int]
    out: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    tokens: int
    remaining: int
    cancelled: bool = False
    error: BaseException | None = None
    admitted_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Row:
    job: Job
    index: int
    seq: int  # arrival order, for oldest-first fairness

    @property
    def length(self) -> int:
        return len(self.job.rows[self.index])


class Observer:
    """Hooks the batcher calls (metrics); the default does nothing."""

    def batch(self, rows: int, padded_tokens: int, forward_s: float) -> None: ...

    def queue(self, tokens: int, rows: int) -> None: ...


def pack(rows: Sequence[_Row], max_tokens: int, max_rows: int, force_oldest: bool = True) -> tuple[list[_Row], list[_Row]]:
    """Choose one batch from the waiting rows.

    Rows sorted longest first form a line; a batch is a contiguous run of it, as many rows as
    ``rows x longest <= max_tokens`` and ``rows <= max_rows`` allow. With ``force_oldest`` the
    run is the one around the oldest row (grown towards shorter rows first: they do not widen
    the batch); otherwise it is the full run with the most real tokens per padded token. The batcher
    forces the oldest row once it has been passed over a few times, so nothing starves.

    Returns:
        (chosen rows, the rest).
    """
    line = sorted(rows, key=lambda r: (-r.length, r.seq))
    if force_oldest:
        k = min(range(len(line)), key=lambda i: line[i].seq)
        lo = hi = k
        while hi + 1 < len(line) and hi - lo + 2 <= max_rows and (hi - lo + 2) * line[lo].length <= max_tokens:
            hi += 1
        while lo > 0 and hi - lo + 2 <= max_rows and (hi - lo + 2) * line[lo - 1].length <= max_tokens:
            lo -= 1
        return line[lo : hi + 1], line[:lo] + line[hi + 1 :]
    lengths = [r.length for r in line]
    prefix = [0]
    for n in lengths:
        prefix.append(prefix[-1] + n)
    best, best_lo, best_hi = -1.0, 0, 0
    for lo, width in enumerate(lengths):
        hi = lo + max(1, min(max_rows, max_tokens // width))
        if hi > len(line):  # only full runs compete: a short tail run would shrink the batch
            break
        score = (prefix[hi] - prefix[lo]) / ((hi - lo) * width)  # real / padded tokens
        if score > best:
            best, best_lo, best_hi = score, lo, hi
    if best_hi == 0:  # fewer rows than one full batch: take them all, longest first
        best_hi = min(len(line), max(1, min(max_rows, max_tokens // lengths[0])))
    return line[best_lo:best_hi], line[:best_lo] + line[best_hi:]


class Batcher:
    """Token-budget batcher over one model function.

    Args:
        run: ``Batch -> (B, D) float32`` (the backend's ``run``); called only on the worker thread.
        collate: ``(rows, pool_starts) -> Batch`` (the text pipeline's right-padding collate).
        dim: embedding width.
        max_batch_tokens: padded tokens per batch.
        max_batch_requests: rows per batch.
        max_queue_tokens: admitted, not yet embedded tokens.
        observer: metric hooks.
    """

    def __init__(self, run: Callable[[Batch], np.ndarray], collate: Callable[..., Batch], dim: int,
                 max_batch_tokens: int, max_batch_requests: int, max_queue_tokens: int,
                 observer: Observer | None = None, patience: int = 3) -> None:
        self._run = run
        self._collate = collate
        self.dim = dim
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.max_queue_tokens = max_queue_tokens
        self.observer = observer or Observer()
        self._cond = threading.Condition()
        self._pending: list[_Row] = []
        self._queued_tokens = 0
        self._queued_rows = 0
        self._pending_tokens = 0
        self._worker_idle = True
        self._seq = itertools.count()
        self._closing = False
        self._handoff: queue.Queue[tuple[list[_Row], Batch] | None] = queue.Queue(maxsize=1)
        self._packer = threading.Thread(target=self._pack_loop, name="nvembed-packer", daemon=True)
        self._worker = threading.Thread(target=self._work_loop, name="nvembed-worker", daemon=True)
        self.batches = 0
        self.patience = patience  # batches the oldest row may be passed over for a better-packed one
        self._oldest = (-1, 0)  # (seq of the oldest waiting row, times passed over)

    # ---- event-loop side ---------------------------------------------------------------------

    def start(self) -> Batcher:
        self._packer.start()
        self._worker.start()
        return self

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def closing(self) -> bool:
        return self._closing

    def alive(self) -> bool:
        """Both threads run (a host's health check: a dead worker thread answers nothing)."""
        return self._packer.is_alive() and self._worker.is_alive()

    def full(self) -> bool:
        """Cheap pre-check before tokenising: the queue is already at its limit."""
        return self._queued_tokens >= self.max_queue_tokens

    def submit(self, rows: list[list[int]], starts: list[int]) -> Job:
        """Admit one request (call on the event loop). Await ``job.future`` for its (N, D) vectors.

        Raises:
            Closed: draining. TooLarge: more tokens than the whole queue holds.
            QueueFull: admitting it would exceed ``max_queue_tokens``.
        """
        tokens = sum(len(r) for r in rows)
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closing:
                raise Closed()
            if tokens > self.max_queue_tokens:
                raise TooLarge(tokens)
            if self._queued_tokens + tokens > self.max_queue_tokens:
                raise QueueFull(self._queued_tokens)
            job = Job(rows, starts, np.empty((len(rows), self.dim), dtype=np.float32), loop.create_future(),
                      loop, tokens, len(rows))
            self._pending.extend(_Row(job, i, next(self._seq)) for i in range(len(rows)))
            self._pending_tokens += tokens
            self._queued_tokens += tokens
            self._queued_rows += len(rows)
            self._cond.notify()
        self.observer.queue(self._queued_tokens, self._queued_rows)
        return job

    def cancel(self, job: Job) -> None:
        """Drop a request's rows that have not been packed yet (its client went away)."""
        job.cancelled = True
        with self._cond:
            mine = [r for r in self._pending if r.job is job]
            if not mine:
                return
            self._pending = [r for r in self._pending if r.job is not job]
            self._pending_tokens -= sum(r.length for r in mine)
            self._queued_tokens -= sum(r.length for r in mine)
            self._queued_rows -= len(mine)
        self.observer.queue(self._queued_tokens, self._queued_rows)

    def close(self, timeout: float | None = None) -> None:
        """Stop admitting, embed everything admitted, then stop the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._packer.join(timeout)
        self._worker.join(timeout)

    # ---- threads -----------------------------------------------------------------------------

    def _pack_loop(self) -> None:
        while True:
            with self._cond:
                # Pack late: when the worker goes idle (by then every row that arrived during the
                # pass competes, so the run pads least), or early when the queue is deep enough
                # that the choice is already good. Collating takes ms; a pass, far longer.
                while not (self._closing or (self._pending and (self._worker_idle or self._deep_queue()))):
                    self._cond.wait()
                if not self._pending:  # closing and empty
                    break
                oldest = min(r.seq for r in self._pending)
                passed = self._oldest[1] + 1 if oldest == self._oldest[0] else 0
                force = passed >= self.patience
                chosen, self._pending = pack(self._pending, self.max_batch_tokens, self.max_batch_requests, force)
                self._pending_tokens -= sum(r.length for r in chosen)
                self._oldest = (oldest, passed)
                self._worker_idle = False  # it has work as soon as this batch is handed over
            rows = [r.job.rows[r.index] for r in chosen]
            batch = self._collate(rows, [r.job.starts[r.index] for r in chosen])
            self._handoff.put((chosen, batch))
        self._handoff.put(None)

    def _deep_queue(self) -> bool:
        return (len(self._pending) >= 4 * self.max_batch_requests
                or self._pending_tokens >= 4 * self.max_batch_tokens)

    def _work_loop(self) -> None:
        while True:
            if self._handoff.empty():
                with self._cond:
                    self._worker_idle = True
                    self._cond.notify_all()
            item = self._handoff.get()
            if item is None:
                break
            chosen, batch = item
            t0 = time.perf_counter()
            try:
                out = self._run(batch)
                # (B, D): the same normalisation as Embedder.embed, row by row
                out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
                err: BaseException | None = None
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting requests
                log.exception("forward pass failed")
                out, err = None, exc
            forward_s = time.perf_counter() - t0
            self.batches += 1
            self.observer.batch(len(chosen), int(batch.input_ids.size), forward_s)
            done: list[Job] = []
            tokens = 0
            for k, r in enumerate(chosen):
                job = r.job
                tokens += r.length
                if err is not None:
                    job.error = err
                else:
                    job.out[r.index] = out[k]
                job.remaining -= 1
                if job.remaining == 0:
                    done.append(job)
            with self._cond:
                self._queued_tokens -= tokens
                self._queued_rows -= len(chosen)
            self.observer.queue(self._queued_tokens, self._queued_rows)
            for job in done:
                job.loop.call_soon_threadsafe(_resolve, job)


def _resolve(job: Job) -> None:
    if job.future.done():  # cancelled by the awaiting side
        return
    if job.error is not None:
        job.future.set_exception(job.error)
    else:
        job.future.set_result(job.out)
