"""The ``local`` backend: one fresh Python process per task on this machine, at most ``workers`` at a time, each
forked from a template process that has imported the trainer once (``process.fork_worker``).

A process that dies (``os._exit``, a segfault, the OOM killer) fails only its own task, with its exit code: there
is no shared pool to break.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

from scaling.executors.base import Backend, Handle, Option, Outcome, Task, TaskFn, available_cpus, describe, execute
from scaling.executors.process import ForkedWorker, collect, fork_worker, pickle_task, signal_worker, worker_path


class LocalHandle:
    """A task of a ``LocalExecutor``: queued, running in its own process, or done."""

    def __init__(self, task: Task, payload: Path) -> None:
        self.task = task
        self.payload = payload
        self.process: ForkedWorker | None = None
        self.started = False  # whether a worker process ever ran the task (not: its run directory was unusable)
        self.cancelled = False
        self._outcome: Outcome | None = None
        self._done = threading.Event()

    def done(self) -> bool:
        return self._done.is_set()

    def outcome(self) -> Outcome:
        self._done.wait()
        assert self._outcome is not None
        return self._outcome

    def finish(self, result: dict | None, error: str | None) -> None:
        self._outcome = (result, error)
        self._done.set()


class LocalExecutor:
    """Runs tasks in ``workers`` processes at once, each task in a fresh Python process of its own.

    Why not ``ProcessPoolExecutor``: when one of its processes dies, the whole pool breaks and every pending
    future fails, with no record of which task killed it. A process per task (``scaling.executors.process``)
    attributes an exit code to exactly one task and gives each run a clean state (threads, memory): a copy of the
    template, which has imported but never run anything. ``fn`` travels by cloudpickle (by reference when
    importable: workers get the driver's own ``sys.path``). A background thread starts queued tasks
    as slots free up.

    Each worker gets its run's ``train.threads`` (``SCALING_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``;
    a task without one, ``max(1, cpus // workers)``): the thread count is part of the run, never of ``workers``.
    Workers run in their own session, so a Ctrl-C at the terminal reaches only the driver, which calls
    ``shutdown(cancel=True)``: SIGTERM to each worker's process group, SIGKILL after ``grace_s``.
    If the driver itself is killed, running workers go on to finish their run (and the next driver finds its
    files).
    """

    def __init__(self, workers: int = 1, fn: TaskFn = execute, grace_s: float = 10.0,
                 poll_s: float = 0.1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.fn = fn
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.threads = max(1, available_cpus() // workers)
        self._tmp = Path(tempfile.mkdtemp(prefix="scaling-workers-"))
        weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)  # even without shutdown()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queue: collections.deque[LocalHandle] = collections.deque()
        self._running: list[LocalHandle] = []
        self._count = 0
        self._closed = False
        self._thread = threading.Thread(target=self._monitor, name="scaling-local-executor", daemon=True)
        self._thread.start()

    def submit(self, tasks: list[Task]) -> list[Handle]:
        handles: list[Handle] = []
        with self._lock:
            if self._closed:
                raise RuntimeError("this executor is shut down")
            for task in tasks:
                path = self._tmp / f"{self._count}.in.pkl"
                self._count += 1
                path.write_bytes(pickle_task(self.fn, task))
                handle = LocalHandle(task, path)
                self._queue.append(handle)
                handles.append(handle)
        self._wake.set()
        return handles

    def attach(self, tasks: list[Task]) -> list[Handle]:
        """None: a killed driver's workers finish on their own, and a rerun's worker waits on the run's lock."""
        return []

    def shutdown(self, cancel: bool) -> None:
        """``cancel=False``: wait for queued and running tasks. ``cancel=True``: queued tasks never start,
        running workers get SIGTERM, then SIGKILL after ``grace_s``; their handles report them cancelled."""
        with self._lock:
            self._closed = True
            if cancel:
                while self._queue:
                    self._queue.popleft().finish(None, "cancelled before it started")
                for handle in self._running:
                    handle.cancelled = True
                    assert handle.process is not None
                    signal_worker(handle.process, signal.SIGTERM)
        self._wake.set()
        self._thread.join(self.grace_s if cancel else None)
        if self._thread.is_alive():
            with self._lock:
                for handle in self._running:
                    assert handle.process is not None
                    signal_worker(handle.process, signal.SIGKILL)
            self._thread.join()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _monitor(self) -> None:
        try:
            while True:
                with self._lock:
                    self._reap()
                    self._launch()
                    if self._closed and not self._queue and not self._running:
                        return
                self._wake.wait(self.poll_s)
                self._wake.clear()
        except BaseException as exc:  # a bug here must not leave the driver waiting forever
            error = f"local executor failed: {describe(exc)}"
            with self._lock:
                for handle in [*self._running, *self._queue]:
                    if handle.process is not None:
                        signal_worker(handle.process, signal.SIGKILL)
                    handle.finish(None, error)
                self._running.clear()
                self._queue.clear()
                self._closed = True

    def _launch(self) -> None:
        while self._queue and len(self._running) < self.workers:
            handle = self._queue.popleft()
            threads = int(handle.task.spec.get("train", {}).get("threads") or self.threads)
            try:
                handle.process = fork_worker(handle.payload, handle.task, threads,
                                             env={**os.environ, "PYTHONPATH": worker_path()})
            except Exception as exc:
                handle.finish(None, f"could not start a worker process: {describe(exc)}")
                continue
            handle.started = True
            self._running.append(handle)

    def _reap(self) -> None:
        for handle in list(self._running):
            assert handle.process is not None
            code = handle.process.poll()
            if code is None:
                continue
            self._running.remove(handle)
            handle.finish(*collect(handle.payload, handle.task, code, handle.cancelled))


def make(runs_dir: Path, fn: TaskFn, options: dict[str, Any]) -> LocalExecutor:
    return LocalExecutor(fn=fn, **options)


BACKEND = Backend(
    name="local",
    summary="worker processes on this machine",
    options=(Option("workers", int, "worker processes at once, 1 if not given (each run uses its train.threads)"),),
    make=make,
)
