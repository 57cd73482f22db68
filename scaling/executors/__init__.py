"""Execution backends: run given training tasks in local worker processes, as Slurm jobs, or on a Ray cluster.

Executors only run what they are given; the driver decides what needs running (it asks the store). A task is
one call ``fn(spec, run_dir) -> result`` (by default ``scaling.train.execute``), which writes its files into
``run_dir`` and resumes from ``run_dir/checkpoint.pt`` when it exists. A handle reports ``(result, None)`` or
``(None, error)``; an error's first line says what happened, the rest is the traceback or a log tail. Workers
never open the DuckDB file.

``BACKENDS`` is the registry, the one list of backends: the command's ``--executor`` choices and option flags and
the checks of the sweep file's ``[executor]`` table read it. A backend is a module ``scaling/executors/NAME.py``
defining ``BACKEND`` (a ``Backend``: its options and ``make``); adding one is that module and its name below.
Importing this package imports no backend's dependencies (submitit, ray): ``make`` does.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from scaling.config import ConfigError, suggest
from scaling.executors.base import (
    Backend,
    Executor,
    ExecutorError,
    Handle,
    Option,
    Outcome,
    Task,
    TaskFn,
    available_cpus,
    execute,
    flag,
)
from scaling.executors.local import LocalExecutor
from scaling.executors.slurm import SlurmExecutor

BACKENDS: dict[str, Backend] = {name: import_module(f"scaling.executors.{name}").BACKEND
                                for name in ("local", "slurm", "ray")}
DEFAULT = "local"
BACKEND_KEY = "backend"  # the [executor] key naming the backend the table is for

__all__ = ["BACKENDS", "Backend", "Executor", "ExecutorError", "Handle", "LocalExecutor", "Option", "Outcome",
           "SlurmExecutor", "Task", "TaskFn", "available_cpus", "check_table", "choose", "execute"]


def takers(name: str) -> list[str]:
    """The backends that take option ``name``."""
    return [b.name for b in BACKENDS.values() if b.option(name)]


def check_table(table: dict[str, Any]) -> dict[str, Any]:
    """The sweep file's ``[executor]`` table, checked and with its values typed: ``backend``, if given, names a
    registered backend and every other key is one of its options; without it, every key must be an option of some
    backend and is checked as the first that takes it (``choose`` checks it again against the backend that runs)."""
    if BACKEND_KEY in table and (not isinstance(table[BACKEND_KEY], str) or table[BACKEND_KEY] not in BACKENDS):
        raise ConfigError(f"executor.{BACKEND_KEY} must be one of {', '.join(BACKENDS)}, got {table[BACKEND_KEY]!r}")
    named = BACKENDS.get(table.get(BACKEND_KEY, ""))
    checked: dict[str, Any] = {}
    for key, value in table.items():
        if key == BACKEND_KEY:
            checked[key] = value
            continue
        key_path = f"executor.{key}"
        if named is not None:
            option = named.option(key)
            if option is None:
                raise ConfigError(f"{key_path} is not an option of the {named.name} executor ({taken(named)})"
                                  f"{suggest(key, [o.name for o in named.options])}")
        else:
            owners = takers(key)
            if not owners:
                known = sorted({o.name for b in BACKENDS.values() for o in b.options})
                raise ConfigError(f"unknown key {key_path}: no executor takes it{suggest(key, known)}")
            option = BACKENDS[owners[0]].option(key)
            assert option is not None
        checked[key] = option.check(value, key_path)
    return checked


def taken(backend: Backend) -> str:
    return f"it takes {', '.join(o.name for o in backend.options)}" if backend.options else "it takes none"


def choose(name: str | None, table: dict[str, Any], given: dict[str, Any]) -> tuple[Backend, dict[str, Any],
                                                                                  str | None]:
    """The backend that runs a sweep, its options, and a note for the user (or None).

    The backend is ``name`` (``--executor``), else the one the ``[executor]`` table names, else local. Its options
    are the table's (unless the table names another backend: then it is ignored, and the note says so), overridden
    by ``given`` (the command line's). An option this backend does not take is a ConfigError naming it, the
    options the backend takes and the backends that take it."""
    chosen = name or table.get(BACKEND_KEY) or DEFAULT
    if chosen not in BACKENDS:
        raise ConfigError(f"unknown executor {chosen!r} (choose from {', '.join(BACKENDS)})")
    backend = BACKENDS[chosen]
    note = None
    from_table = {k: v for k, v in table.items() if k != BACKEND_KEY}
    if table.get(BACKEND_KEY, chosen) != chosen:
        note = (f"note: the sweep file's [executor] table is for the {table[BACKEND_KEY]} executor; "
                f"ignored with --executor {chosen}")
        from_table = {}
    options: dict[str, Any] = {}
    for where, values in (("sweep file", from_table), ("command line", given)):
        for key, value in values.items():
            option = backend.option(key)
            label = f"executor.{key}" if where == "sweep file" else flag(key)
            if option is None:
                others = takers(key)
                hint = f"; {label} is for the {' and '.join(others)} executor" if others else ""
                advice = (" (or name the executor the table is for: backend = ...)"
                          if where == "sweep file" and others else "")
                raise ConfigError(f"{label} ({where}) is not an option of the {chosen} executor ({taken(backend)})"
                                  f"{hint}{advice}")
            options[key] = option.check(value, label)
    return backend, options, note
