"""Long work off the UI thread: a job with stages, progress, cancellation and a captured error.

Jobs run on one shared ``concurrent.futures.ThreadPoolExecutor``: ``start`` submits the job and keeps its
``Future`` (what ``join`` waits on); a ``threading.Event`` carries a cancel request into the stages' loops
(``check_cancelled``). The same check enforces a time limit set on the running thread (``time_limit``), so a
computation that calls it stops within one chunk of its deadline.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any


class JobCancelled(Exception):
    """Raised inside a job's stage when the user cancelled it."""


class TimeLimitExceeded(Exception):
    """Raised by ``check_cancelled`` when the thread's ``time_limit`` has passed."""


_current = threading.local()
_executor = ThreadPoolExecutor(thread_name_prefix="tda-job")
_running: set[BackgroundJob] = set()
_running_lock = threading.Lock()


def _cancel_running_jobs() -> None:
    """At interpreter exit the executor waits for its running jobs (its workers are not daemon threads): ask them to
    stop first, so exit waits for one chunk of a computation rather than all of it."""
    with _running_lock:
        jobs = list(_running)
    for job in jobs:
        job.cancel()


# Runs before concurrent.futures' own exit hook (registered earlier, called later), which joins the workers.
getattr(threading, "_register_atexit", lambda fn: None)(_cancel_running_jobs)


def check_cancelled() -> None:
    """Raise ``JobCancelled`` if the job running on this thread was cancelled, or ``TimeLimitExceeded`` once the
    thread's ``time_limit`` has passed (no-op elsewhere).

    Long loops (per-sample gradient chunks, training epochs, curvature products) call this, so a cancel or a
    deadline takes effect within one chunk rather than at the end of a stage.
    """
    job = getattr(_current, "job", None)
    if job is not None and job._cancel.is_set():
        raise JobCancelled(f"cancelled during {job.label!r}")
    deadline = getattr(_current, "deadline", None)
    if deadline is not None and time.perf_counter() > deadline:
        raise TimeLimitExceeded("ran past its time limit")


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Within this block, ``check_cancelled`` on this thread raises ``TimeLimitExceeded`` after ``seconds`` (an outer
    limit that ends sooner still holds)."""
    previous = getattr(_current, "deadline", None)
    deadline = time.perf_counter() + seconds
    _current.deadline = deadline if previous is None else min(previous, deadline)
    try:
        yield
    finally:
        _current.deadline = previous


def report_progress(fraction: float, label: str | None = None) -> None:
    """Tell the job running on this thread how far its current stage is (0..1), and optionally what it does now;
    its views are updated (no-op outside a job)."""
    job = getattr(_current, "job", None)
    if job is None:
        return
    stages = len(job.stages)
    job.progress = (job._stage + min(max(float(fraction), 0.0), 1.0)) / stages
    if label is not None:
        job.label = label
    job._notify()


class BackgroundJob:
    """Runs ``stages`` (callables taking the previous stage's result) in a worker thread.

    Progress is the share of stages done; cancellation is honoured between stages (and inside them where
    they call ``check_cancelled``); an exception is kept in ``error`` (with its traceback) instead of being
    lost in a log.

    Parameters
    ----------
    stages : sequence of (label, callable)
        Each callable receives the previous result (None for the first).
    on_update : callable job -> None, optional
        Called from the worker after every stage and at the end (views refresh here).
    """

    def __init__(self, stages: Sequence[tuple[str, Callable[[Any], Any]]],
                 on_update: Callable[[BackgroundJob], None] | None = None):
        self.stages = list(stages)
        self.on_update = on_update
        self.progress = 0.0
        self.label = "queued"
        self.result: Any = None
        self.error: BaseException | None = None
        self.traceback = ""
        self.state = "pending"  # pending, running, done, failed, cancelled
        self._cancel = threading.Event()
        self._future: Future | None = None
        self._stage = 0  # index of the stage running (report_progress)

    @property
    def future(self) -> Future | None:
        """The ``concurrent.futures.Future`` of the run (None before ``start``); it completes after the last
        ``on_update``. Its result is None: the job keeps ``result``, ``error`` and ``state``."""
        return self._future

    def start(self) -> BackgroundJob:
        if self._future is not None:
            raise RuntimeError("a job can only be started once")
        self.state = "running"
        with _running_lock:
            _running.add(self)
        self._future = _executor.submit(self._run)
        return self

    def cancel(self) -> None:
        """Ask the job to stop before its next stage (or at its stage's next ``check_cancelled``)."""
        self._cancel.set()

    def join(self, timeout: float | None = None) -> BackgroundJob:
        """Wait until the job has finished (its last ``on_update`` included), or ``timeout`` seconds."""
        if self._future is None:
            raise RuntimeError("cannot join a job before it is started")
        wait([self._future], timeout)
        return self

    @property
    def done(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def _notify(self) -> None:
        if self.on_update is not None:
            try:
                self.on_update(self)
            except Exception:  # a broken view must not kill the job
                self.traceback += traceback.format_exc()

    def _run(self) -> None:
        result = None
        _current.job = self
        try:
            for i, (label, fn) in enumerate(self.stages):
                if self._cancel.is_set():
                    raise JobCancelled(f"cancelled before {label!r}")
                self.label, self._stage = label, i
                self._notify()
                result = fn(result)
                self.progress = (i + 1) / len(self.stages)
            self.result, self.state, self.label = result, "done", "done"
        except JobCancelled as err:
            self.state, self.label, self.error = "cancelled", str(err), err
        except Exception as err:  # shown in the panel, not lost
            self.state, self.label, self.error = "failed", f"{type(err).__name__}: {err}", err
            self.traceback = traceback.format_exc()
        finally:
            _current.job = None  # the worker thread runs other jobs next
            with _running_lock:
                _running.discard(self)
        self._notify()
