"""``scaling run``: build the executor, show progress (a live bar on a terminal, log lines otherwise), summarise."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from scaling.config import SweepConfig
from scaling.executors import choose
from scaling.output import emit, err
from scaling.runner import SweepOutcome, execute_locked, failure_advice, run_sweep
from scaling.runner import dry_run as dry_run_plan
from scaling.store import connect


def execute_sweep(sweep: SweepConfig, db: str | None, runs_dir: Path, executor: str | None = None,
                  options: dict | None = None, retries: int = 1, dry_run: bool = False,
                  fmt: str = "table") -> SweepOutcome | None:
    """Run (or with ``dry_run`` list) the unfinished runs of a sweep; prints progress and how to resume.

    ``executor``: the backend's name (default: the one the sweep's ``[executor]`` table names, else local);
    ``options``: the command line's options for it, over the table's (``scaling.executors.choose`` checks both)."""
    backend, settings, note = choose(executor, sweep.executor, options or {})
    if note:
        err(note)
    if dry_run:
        todo = dry_run_plan(db, sweep, retries)
        emit(todo, fmt, title=f"{len(todo)} runs would train")
        if fmt == "table":
            err(f"total: {todo.trains.sum():.3g} FLOPs, about {duration(todo.est_seconds.sum())} of training "
                "with one worker")
        return None
    con = connect(db)
    try:
        started = time.monotonic()
        with Reporter(sweep.name, runs_dir) as reporter:
            runner = backend.make(runs_dir, execute_locked, settings)
            outcome = run_sweep(con, sweep, runner, runs_dir, retries=retries, on_update=reporter.update)
            if not outcome.interrupted:  # (an interrupted sweep has cancelled its executor)
                runner.shutdown(cancel=False)  # nothing is in flight: lets a backend tidy up (ray: idle actors)
        elapsed = duration(time.monotonic() - started)
        if outcome.interrupted:
            err(f"interrupted: finished runs are stored; rerun `scaling run {sweep.path or sweep.name}` with the same "
                "options to resume (interrupted runs continue from their last checkpoint)")
            sys.exit(130)
        counts = ", ".join(f"{n} {s}" for s, n in sorted(outcome.counts.items())) or "nothing to train"
        exhausted = f"; {outcome.exhausted} failed before, retries used up" if outcome.exhausted else ""
        err(f"{sweep.name}: {counts}; {outcome.skipped} already done{exhausted}; {elapsed}")
        if outcome.failed:
            err(failure_advice(con, sweep.name, retries, f"scaling run {sweep.path or sweep.name}"))
        return outcome
    finally:
        con.close()


def duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Reporter:
    """Live progress: sweep bar (runs, FLOPs, ETA) and one bar per running run; plain log lines when piped."""

    def __init__(self, name: str, runs_dir: Path) -> None:
        self.name = name
        self.live = sys.stdout.isatty()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), disable=not self.live)
        self.sweep_task = None
        self.run_tasks: dict[str, int] = {}
        self.total_flops = 0.0
        self.done_flops = 0.0
        self.n_done = 0
        self.total = 0

    def __enter__(self) -> Reporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.total, self.n_done = event["total"], event["done"]
            self.total_flops, self.done_flops = event["total_flops"], event["done_flops"]
            self.sweep_task = self.progress.add_task(self.name, total=self.total, completed=self.n_done,
                                                     info=self.flops_info())
        elif kind == "retry":
            if not self.live:
                print(f"[{self.n_done}/{self.total}] {event['run_id']} failed, retrying", file=sys.stderr)
        elif kind == "done":
            self.n_done += 1
            self.done_flops += event["flops"]
            self.progress.update(self.sweep_task, completed=self.n_done, info=self.flops_info())
            if event["run_id"] in self.run_tasks:
                self.progress.remove_task(self.run_tasks.pop(event["run_id"]))
            if not self.live:
                print(f"[{self.n_done}/{self.total}] {event['run_id']} {event['status']}", file=sys.stderr)
        elif kind == "tick" and self.live:
            for task in event["running"]:
                step, steps = read_progress(Path(task.run_dir))
                if steps is None:
                    continue
                if task.run_id not in self.run_tasks:
                    self.run_tasks[task.run_id] = self.progress.add_task(f"  {task.run_id}", total=steps, info="")
                self.progress.update(self.run_tasks[task.run_id], completed=step)

    def flops_info(self) -> str:
        return f"{self.done_flops:.2e}/{self.total_flops:.2e} FLOPs"


def read_progress(run_dir: Path) -> tuple[int, int | None]:
    """The trainer's ``progress.json`` ({"step", "steps"}), if it has written one."""
    try:
        data = json.loads((run_dir / "progress.json").read_text())
        return int(data["step"]), int(data["steps"])
    except (OSError, ValueError, KeyError):
        return 0, None
