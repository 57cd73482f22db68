"""What every execution backend shares: the task, the handle and executor protocols, option schemas, and the
helpers that turn a task's exception or a worker's log into the one error string a handle reports."""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from scaling.config import ConfigError

TaskFn = Callable[[dict, str], dict]
Outcome = tuple[dict | None, str | None]

LOG_NAME = "worker.log"
THREAD_VARS = ("SCALING_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ExecutorError(RuntimeError):
    """A backend problem phrased for the user (e.g. Slurm not installed, no Ray cluster at the address)."""


@dataclass
class Task:
    """One run to execute."""

    run_id: str
    spec: dict  # RunSpec.to_dict()
    run_dir: str


class Handle(Protocol):
    task: Task

    def done(self) -> bool: ...

    def outcome(self) -> Outcome:
        """``(result, None)`` or ``(None, error)``; waits until the task is done."""
        ...


class Executor(Protocol):
    def submit(self, tasks: list[Task]) -> list[Handle]:
        """Start ``tasks``; one handle each, in order."""
        ...

    def attach(self, tasks: list[Task]) -> list[Handle]:
        """Handles for those of ``tasks`` that an earlier driver submitted and that are still in flight (or
        finished with an outcome nobody collected); the driver submits only the others. [] if it cannot tell."""
        ...

    def shutdown(self, cancel: bool) -> None:
        """``cancel=True``: stop what is in flight (its handles report it cancelled)."""
        ...


def flag(name: str) -> str:
    """The command-line flag of option ``name``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Option:
    """One setting of a backend: a key of the sweep file's ``[executor]`` table and ``--name`` on the command
    line. ``kind`` is ``str``, ``int`` (a whole number, ``8.0`` allowed) or ``float``; numbers are at least
    ``minimum`` (0: zero allowed; a ``float`` option with minimum 0 and ``positive`` must exceed it)."""

    name: str
    kind: type
    help: str
    minimum: float = 1
    positive: bool = False

    @property
    def flag(self) -> str:
        return flag(self.name)

    def check(self, value: Any, key: str) -> Any:
        """``value`` as this option's type, or a ConfigError naming ``key``."""
        if self.kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"{key} must be a string, got {value!r}")
            return value
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if self.kind is int:
            if not (number and float(value).is_integer() and value >= self.minimum):
                raise ConfigError(f"{key} must be a whole number >= {self.minimum:g}, got {value!r}")
            return int(value)
        if not (number and value >= self.minimum and not (self.positive and value <= self.minimum)):
            bound = "a positive number" if self.positive else f"a number >= {self.minimum:g}"
            raise ConfigError(f"{key} must be {bound}, got {value!r}")
        return float(value)


@dataclass(frozen=True)
class Backend:
    """An execution backend as the registry knows it: its name, what it is (one line), the options it takes,
    and ``make(runs_dir, fn, options) -> Executor``, which imports whatever the backend needs only when called."""

    name: str
    summary: str
    options: tuple[Option, ...]
    make: Callable[[Path, TaskFn, dict[str, Any]], Executor]

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)


def execute(spec: dict, run_dir: str) -> dict:
    """The default task: train one run (imported in the worker, so that submitting does not load torch)."""
    from scaling.train import execute as train

    return train(spec, run_dir)


def describe(exc: BaseException) -> str:
    """``Type: message`` on the first line, then the traceback."""
    first = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return f"{first}\n{''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))}"


def run_task(fn: TaskFn, spec: dict, run_dir: str) -> Outcome:
    """Call ``fn``; an exception becomes the error (``SystemExit`` passes: submitit requeues with it)."""
    try:
        return fn(spec, run_dir), None
    except Exception as exc:
        return None, describe(exc)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def limit_threads(threads: int) -> None:
    """Set this process's thread count: ``SCALING_THREADS``, the OpenMP/MKL variables, and torch itself if it is
    already imported (the trainer then sets the spec's ``train.threads``)."""
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return f"\n--- last lines of {path}:\n{tail}" if tail else ""


class Ledger:
    """What a driver submitted per run (run_id → a dict of strings), in a JSON file that drivers share: updates
    hold a file lock and replace the file atomically, so a killed driver's successor reads a whole one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, str]]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):  # none yet; torn cannot happen (atomic writes), hand-edited might
            return {}

    def record(self, entries: dict[str, dict[str, str]]) -> None:
        """Add or replace these runs' entries, each stamped with ``submitted_at``."""
        with self._locked():
            ledger = self.load()
            now = time.strftime("%Y-%m-%dT%H:%M:%S")
            ledger.update({run_id: {**entry, "submitted_at": now} for run_id, entry in entries.items()})
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(ledger, indent=1, sort_keys=True))
            os.replace(tmp, self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
