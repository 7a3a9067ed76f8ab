"""Dynamic batching: requests queue up as jobs; one worker thread runs the model on batches of compatible jobs.

A job's `key` says which jobs may share a batch (same task, same decoding settings); `rows` is its share of the
batch size (a request for n samples counts n). The worker takes the oldest job, then waits until `max_wait_s`
after that job's arrival for more jobs with the same key, up to `max_batch_rows` rows, and hands the batch to
`run(jobs)`. Jobs with other keys keep their place in the queue. `max_batch_rows=1` turns batching off.

The model never runs on two batches at once (one thread), so request handlers only wait: each job reports
through `job.emit(event)`, a callback its owner sets (the server turns it into an asyncio queue). A job holds
one of `max_pending` slots from `submit` until it finishes or is cancelled, whichever comes first: a client
that goes away frees its slot at once, a queued job is dropped, and a running batch whose jobs are all
finished or cancelled may stop early (the runner checks `Job.settled`).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

__all__ = ["Backlogged", "Batcher", "Job", "QueueFull"]


class QueueFull(RuntimeError):
    """Every slot is taken: the caller should answer "busy" (HTTP 503)."""


class Backlogged(RuntimeError):
    """`max_queue` requests already wait to start: the caller should answer "too many requests" (HTTP 429)."""


@dataclass(eq=False)
class Job:
    key: Hashable
    payload: Any
    rows: int = 1
    emit: Callable[[tuple], None] = lambda event: None  # ("delta", ...), ("done", result) or ("error", exc)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # the client went away
    finished: bool = False  # its final event was emitted
    _released: bool = False  # its slot was given back
    _on_settle: Callable[[], None] = lambda: None  # gives the slot back (set by Batcher.submit)

    @property
    def settled(self) -> bool:
        """Nothing more is owed to this job's client."""
        return self.finished or self.cancelled

    def done(self, result: Any) -> None:
        if not self.settled:
            self.finished = True
            self._on_settle()  # first: a client that has its answer sees its slot free
            self.emit(("done", result))

    def fail(self, error: BaseException) -> None:
        if not self.settled:
            self.finished = True
            self._on_settle()
            self.emit(("error", error))


class Batcher:
    def __init__(self, run: Callable[[list[Job]], None], max_batch_rows: int = 8, max_wait_s: float = 0.01,
                 max_pending: int = 64, max_queue: int | None = None):
        if max_batch_rows < 1 or max_pending < 1 or max_wait_s < 0:
            raise ValueError(f"Batcher: max_batch_rows ({max_batch_rows}) and max_pending ({max_pending}) must be "
                             f">= 1 and max_wait_s ({max_wait_s}) >= 0")
        self.run, self.max_batch_rows, self.max_wait_s, self.max_pending = run, max_batch_rows, max_wait_s, max_pending
        self.max_queue = max_queue
        self._closing = False  # shutting down: running and queued jobs finish, new ones are refused
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._open = 0  # slots held: queued + running jobs not yet finished or cancelled
        self._running = False
        self._thread: threading.Thread | None = None
        self._batch_sizes: Counter = Counter()  # jobs per batch -> how many batches

    # -------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "Batcher":
        with self._cond:
            if self._thread is None:
                self._running = True
                self._thread = threading.Thread(target=self._loop, name="blip2-batcher", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 10.0, drain_s: float = 0.0) -> None:
        """Refuse new jobs, give the jobs already submitted up to `drain_s` seconds to finish, then stop taking
        batches: jobs still queued fail with RuntimeError; the running batch (if any) completes."""
        deadline = time.monotonic() + drain_s
        with self._cond:
            self._closing = True
            while self._open and self._thread is not None and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(min(left, 0.05))
            self._running = False
            pending, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for job in pending:
            job.fail(RuntimeError("the server is shutting down"))
            self._release(job)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ------------------------------------------------------------------------------------ submitting
    def submit(self, job: Job) -> Job:
        with self._cond:
            if not self._running or self._closing:
                raise QueueFull("the server is shutting down" if self._closing else "the batcher is not running")
            if self._open >= self.max_pending:
                raise QueueFull(f"all {self.max_pending} request slots are busy")
            if self.max_queue is not None and len(self._queue) >= self.max_queue:
                raise Backlogged(f"{len(self._queue)} requests are waiting to start (the limit is {self.max_queue})")
            self._open += 1
            job._on_settle = functools.partial(self._release, job)
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it is still queued and give its slot back now."""
        job.cancelled = True
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                pass  # running or done
            self._cond.notify_all()
        self._release(job)

    def _release(self, job: Job) -> None:
        with self._cond:
            if not job._released:
                job._released = True
                self._open -= 1
                self._cond.notify_all()  # stop() may be waiting for the last job

    def stats(self) -> dict:
        with self._cond:
            sizes = dict(sorted(self._batch_sizes.items()))
            return {"pending": self._open, "queued": len(self._queue), "batches": sum(sizes.values()),
                    "largest_batch": max(sizes, default=0), "batch_sizes": sizes}

    # ---------------------------------------------------------------------------------------- worker
    def _take(self) -> list[Job] | None:
        """Block until a batch is ready; None when stopping."""
        with self._cond:
            while True:
                if not self._running:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                batch = self._ready_batch()
                if batch is not None:
                    return batch

    def _ready_batch(self) -> list[Job] | None:
        """With the lock held and jobs queued: the batch of the oldest job, taken off the queue, once it is full
        or its wait is over; else wait (until then, or a submit) and None."""
        first = self._queue[0]
        batch, rows, overflow = [], 0, False
        for job in self._queue:  # oldest first; a job larger than the limit still runs, alone
            if job.key != first.key:
                continue
            if batch and rows + job.rows > self.max_batch_rows:
                overflow = True  # a compatible job is waiting that does not fit: no point in waiting
                continue
            batch.append(job)
            rows += job.rows
        wait = first.arrived + self.max_wait_s - time.monotonic()
        if rows >= self.max_batch_rows or overflow or wait <= 0:
            for job in batch:
                self._queue.remove(job)
            return batch
        self._cond.wait(wait)
        return None

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            with self._cond:
                self._batch_sizes[len(batch)] += 1
            try:
                self._run_isolated(batch)
            finally:
                for job in batch:
                    if not job.settled:  # the runner owes every job a final event
                        job.fail(RuntimeError("the batch ended without a result for this request"))
                    self._release(job)

    def _run_isolated(self, batch: list[Job]) -> None:
        """Run a batch; if it fails, run its unfinished jobs one by one so one bad request cannot sink the
        others (each then gets its own error)."""
        try:
            self.run(batch)
            return
        except Exception as e:  # noqa: BLE001 - reported to the clients, the worker must survive
            if len(batch) == 1:
                batch[0].fail(e)
                return
        for job in batch:
            if job.settled:
                continue
            try:
                self.run([job])
            except Exception as e:  # noqa: BLE001
                job.fail(e)
