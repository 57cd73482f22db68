"""The sweep driver: the store decides what is done, an executor runs the rest, the driver ingests results.

Only this process opens the database. Workers train through ``execute_locked``, which holds an exclusive lock
on the run directory, so a run left training by a killed driver is never trained twice at once: a rerun waits
for it and then finds its finished files.
"""

from __future__ import annotations

import fcntl
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pandas as pd

from scaling.branches import blocked_on, trained_flops
from scaling.config import SweepConfig
from scaling.executors import Executor, Handle, Task
from scaling.grid import plan
from scaling.runfiles import DamagedRunFile, read_finished
from scaling.store import StoreError, connect, db_path, ingest_all, ingest_run, mark, register_plan

DEFAULT_FLOPS_PER_S = 1e10  # one small-model worker on a laptop-class CPU core (measured: 0.9-2.6e10)


def execute_locked(spec: dict, run_dir: str) -> dict:
    """Train one run under an exclusive lock on its directory; an already finished run is not retrained."""
    from scaling.train import execute

    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            done, _ = read_finished(path, spec.get("run_id"))
        except (FileNotFoundError, DamagedRunFile):  # unfinished, or damaged: the driver sets it aside
            done = {}
        if done.get("status") in ("ok", "diverged"):
            return {k: v for k, v in done.items() if k not in ("metrics", "router")}
        return execute(spec, run_dir)


class CtrlC:
    """The driver's Ctrl-C while a sweep runs: the first SIGINT only sets ``requested``, which the driver checks
    between steps, so it is honoured wherever it lands; a second one raises ``KeyboardInterrupt``.

    Why not Python's default handler: (1) a process started with SIGINT ignored keeps it ignored, and a shell
    script's background job (``cmd &``) is started so: such a sweep trained to the end through Ctrl-C; (2) a
    KeyboardInterrupt raised while DuckDB runs a query becomes DuckDB's ``RuntimeError("Query interrupted")`` or a
    UDF error, not a KeyboardInterrupt. Installed only in the main thread (the only one Python delivers to)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: object = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


CONTINUED = ("running", "interrupted")  # a resubmitted run in these states continues its attempt


@dataclass
class SweepOutcome:
    """``counts``: final status of each run trained now; ``skipped``: runs already finished (ok or diverged);
    ``exhausted``: failed runs left alone because they used up their retries; ``failed``: the sweep's failed runs
    at the end."""

    counts: dict[str, int] = field(default_factory=dict)
    trained: list[str] = field(default_factory=list)
    skipped: int = 0
    exhausted: int = 0
    failed: int = 0
    interrupted: bool = False


def count_status(con: duckdb.DuckDBPyConnection, sweep: str, statuses: tuple[str, ...]) -> int:
    return con.execute("SELECT count(*) FROM runs r JOIN sweep_runs s USING (run_id) "
                       "WHERE s.sweep = ? AND list_contains(?, r.status)", [sweep, list(statuses)]).fetchall()[0][0]


def to_train(runs: pd.DataFrame, retries: int) -> pd.DataFrame:
    """The runs (columns status, attempts, flops) that are not finished: never ``ok`` or ``diverged``, and failed
    ones only while attempts ≤ retries (an attempt is a submission that started the run afresh; resuming an
    interrupted run continues its attempt); largest first."""
    todo = ~runs.status.isin(["ok", "diverged"]) & ~((runs.status == "failed") & (runs.attempts > retries))
    return runs[todo].sort_values("flops", ascending=False, kind="stable").reset_index(drop=True)


def runs_to_do(con: duckdb.DuckDBPyConnection, sweep: str, retries: int) -> pd.DataFrame:
    """The sweep's runs in the store that ``to_train`` keeps."""
    return to_train(con.execute("""
        SELECT r.run_id, r.spec, r.run_dir, r.flops, r.status, r.attempts, r.error
        FROM runs r JOIN sweep_runs s USING (run_id) WHERE s.sweep = ?""", [sweep]).df(), retries)


def dry_run(db: str | None, sweep: SweepConfig, retries: int) -> pd.DataFrame:
    """What ``run_sweep`` would train, read without writing anything: the plan, with the statuses the store (if
    there is one) has for its runs, the FLOPs each trains itself (``trains``; a branch: its cooldown) and a time
    estimate for those from the store's measured FLOP/s (median of finished runs), else a CPU default. Run files
    not yet ingested count as not done."""
    planned = plan(sweep).runs
    runs = planned[["run_id", "flops"]].assign(trains=trained_flops(planned))
    known = pd.DataFrame({"run_id": pd.Series(dtype=str), "status": pd.Series(dtype=str),
                          "attempts": pd.Series(dtype="int64")})
    measured = None
    if db_path(db).exists():
        con = connect(db, read_only=True)
        try:
            known = con.execute("SELECT run_id, status, attempts FROM runs WHERE list_contains(?, run_id)",
                                [list(runs.run_id)]).df()
            measured = con.execute("SELECT median(flops_per_s) FROM runs WHERE status = 'ok'").fetchall()[0][0]
        finally:
            con.close()
    table = to_train(runs.merge(known, on="run_id", how="left").fillna({"status": "planned", "attempts": 0}),
                     retries)
    return table[["run_id", "status", "flops", "trains"]].assign(
        est_seconds=table.trains / (measured or DEFAULT_FLOPS_PER_S))


def prepare(con: duckdb.DuckDBPyConnection, sweep: SweepConfig, runs_dir: Path) -> pd.DataFrame:
    """Plan the sweep into the store and ingest run files finished since the last driver stopped."""
    planned = plan(sweep)
    register_plan(con, sweep, planned.runs, runs_dir)
    ingest_all(con, sweep.name)
    return planned.runs


def run_sweep(con: duckdb.DuckDBPyConnection, sweep: SweepConfig, executor: Executor, runs_dir: Path,
              retries: int = 1, on_update: Callable[[dict], None] | None = None,
              poll_s: float = 0.2) -> SweepOutcome:
    """Train every unfinished run of ``sweep`` and ingest each result as soon as it lands.

    Runs a previous driver submitted and never collected (status ``running``) are first offered to the
    executor's ``attach`` (Slurm: jobs still queued or running; Ray: actors still alive); only the others are
    submitted. A branch is submitted once its trunk's checkpoint at its cooldown start exists (while the trunk
    trains on), and fails if its trunk stops without one. On Ctrl-C the executor is shut down, results that landed
    meanwhile are ingested and the runs still in flight are marked ``interrupted``. ``on_update`` receives progress
    events: {"event": "start"|"done"|"tick", ...}.
    """
    with CtrlC() as ctrl_c:
        try:
            runs = prepare(con, sweep, runs_dir)
        except KeyboardInterrupt:  # before anything was submitted: the plan's transaction is rolled back
            rollback(con)
            return SweepOutcome(interrupted=True)
        if ctrl_c.requested:
            return SweepOutcome(interrupted=True)
        return train_all(con, sweep, runs, executor, retries, on_update or (lambda event: None), poll_s, ctrl_c)


def train_all(con: duckdb.DuckDBPyConnection, sweep: SweepConfig, runs: pd.DataFrame, executor: Executor,
              retries: int, notify: Callable[[dict], None], poll_s: float, ctrl_c: CtrlC) -> SweepOutcome:
    """``run_sweep`` once the plan is stored: submit, collect and retry until done or Ctrl-C."""
    todo = runs_to_do(con, sweep.name, retries)
    skipped = count_status(con, sweep.name, ("ok", "diverged"))
    outcome = SweepOutcome(skipped=skipped, exhausted=len(runs) - len(todo) - skipped)
    total_flops = float(runs.flops.sum())
    done_flops = total_flops - float(todo.flops.sum())
    notify({"event": "start", "total": len(runs), "done": len(runs) - len(todo), "total_flops": total_flops,
            "done_flops": done_flops, "todo": todo})
    rows = {row["run_id"]: row for row in todo.to_dict("records")}
    attempts = {run_id: int(row["attempts"]) for run_id, row in rows.items()}  # as in the store
    counted: dict[str, bool] = {}  # whether a run's last submission counted as an attempt
    handles: list[Handle] = []
    try:
        handles = attach(executor, [rows[r] for r in rows if rows[r]["status"] == "running"])
        attached = {h.task.run_id for h in handles}
        waiting = {r: path for r, row in rows.items() if r not in attached and (path := blocked(row))}
        handles += submit(con, executor, [row for r, row in rows.items() if r not in attached and r not in waiting],
                          attempts, counted)
        while (handles or waiting) and not ctrl_c.requested:
            time.sleep(poll_s)
            notify({"event": "tick", "running": [h.task for h in handles]})
            for handle in list(handles):
                if ctrl_c.requested:
                    break
                if not handle.done():
                    continue
                task = handle.task
                status = finish(con, handle)
                handles.remove(handle)
                rows[task.run_id] = {**rows[task.run_id], "status": status}
                retry = status == "failed" and attempts[task.run_id] <= retries
                if not getattr(handle, "started", True):  # never ran (e.g. a read-only runs directory): no
                    uncount(con, task.run_id, attempts, counted)  # attempt used, no retry until the next sweep
                    retry = False
                if not retry:
                    outcome.counts[status] = outcome.counts.get(status, 0) + 1
                if status == "ok":
                    outcome.trained.append(task.run_id)
                notify({"event": "retry" if retry else "done", "run_id": task.run_id, "status": status,
                        "flops": float(rows[task.run_id]["flops"])})
                if retry:
                    handles += submit(con, executor, [rows[task.run_id]], attempts, counted)
            if ctrl_c.requested:
                break
            ready, orphans = release(waiting, {h.task.run_id for h in handles})
            handles += submit(con, executor, [rows[r] for r in ready], attempts, counted)
            for run_id, trunk in orphans:
                mark(con, run_id, "failed", f"its trunk {trunk} is not training and has no checkpoint at this "
                     "branch's start")
                outcome.counts["failed"] = outcome.counts.get("failed", 0) + 1
                notify({"event": "done", "run_id": run_id, "status": "failed", "flops": float(rows[run_id]["flops"])})
        if ctrl_c.requested:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupt(con, executor, handles, list(rows))
        outcome.interrupted = True
    outcome.failed = count_status(con, sweep.name, ("failed",))
    return outcome


def blocked(row: dict) -> Path | None:
    """The trunk checkpoint a branch waits for, if it is not there yet (``branches.blocked_on``)."""
    return blocked_on(json.loads(row["spec"]) if isinstance(row["spec"], str) else row["spec"], row["run_dir"])


def release(waiting: dict[str, Path], in_flight: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Take from ``waiting`` (branch run_id → the trunk checkpoint it waits for) the branches whose checkpoint has
    appeared (to submit) and those whose trunk is not in flight (``in_flight``: run_ids), so never will write it
    (to fail, with their trunk's id)."""
    ready, orphans = [], []
    for run_id, path in list(waiting.items()):
        trunk = path.parent.name  # branches.trunk_dir
        if path.exists():
            ready.append(run_id)
        elif trunk not in in_flight:
            orphans.append((run_id, trunk))
        else:
            continue
        del waiting[run_id]
    return ready, orphans


def attach(executor: Executor, rows: list[dict]) -> list[Handle]:
    """Handles for runs a previous driver submitted that are still in flight, if the executor can tell."""
    return executor.attach(tasks_of(rows)) if rows else []


def submit(con: duckdb.DuckDBPyConnection, executor: Executor, rows: list[dict],
           attempts: dict[str, int], counted: dict[str, bool]) -> list[Handle]:
    """Mark ``rows`` running (one more attempt each, unless it resumes an interrupted one; ``counted`` says which)
    and hand them to the executor; if it refuses them, they get their previous status and attempt count back
    and the error propagates."""
    tasks = tasks_of(rows)
    if not tasks:
        return []
    fresh = {row["run_id"]: row["status"] not in CONTINUED or attempts[row["run_id"]] == 0 for row in rows}
    counted.update(fresh)
    for task in tasks:
        mark(con, task.run_id, "running", attempt=fresh[task.run_id])
        attempts[task.run_id] += fresh[task.run_id]
    try:
        return executor.submit(tasks)
    except Exception:
        for row in rows:
            con.execute("UPDATE runs SET status = ?, error = ?, attempts = attempts - ? WHERE run_id = ?",
                        [row["status"], row.get("error"), int(fresh[row["run_id"]]), row["run_id"]])
            attempts[row["run_id"]] -= fresh[row["run_id"]]
        raise


def uncount(con: duckdb.DuckDBPyConnection, run_id: str, attempts: dict[str, int], counted: dict[str, bool]) -> None:
    """Give back the attempt that a submission counted."""
    if counted.pop(run_id, False):
        con.execute("UPDATE runs SET attempts = attempts - 1 WHERE run_id = ?", [run_id])
        attempts[run_id] -= 1


def failure_advice(con: duckdb.DuckDBPyConnection, sweep: str, retries: int, command: str) -> str:
    """What to do about a sweep's failed runs: rerunning retries those with attempts left; the others need a
    larger ``--retries``, once their cause (``scaling status``) is fixed."""
    left, used = con.execute("""
        SELECT count(*) FILTER (r.attempts <= ?), count(*) FILTER (r.attempts > ?)
        FROM runs r JOIN sweep_runs s USING (run_id) WHERE s.sweep = ? AND r.status = 'failed'""",
                             [retries, retries, sweep]).fetchall()[0]
    parts = [f"{left + used} run(s) failed: `scaling status {sweep}` shows why"]
    if left:
        parts.append(f"{left} will be tried again by rerunning `{command}`")
    if used:
        parts.append(f"{used} used up --retries {retries}: once the cause is fixed, rerun with --retries "
                     f"{retries + 1}")
    return "; ".join(parts)


def tasks_of(rows: list[dict]) -> list[Task]:
    return [Task(run_id=r["run_id"], spec=json.loads(r["spec"]) if isinstance(r["spec"], str) else r["spec"],
                 run_dir=r["run_dir"]) for r in rows]


def interrupt(con: duckdb.DuckDBPyConnection, executor: Executor, handles: list[Handle],
              run_ids: list[str]) -> None:
    """After Ctrl-C: stop the executor, keep what finished, mark what was still in flight ``interrupted``."""
    rollback(con)  # an ingest that the interrupt cut short
    try:
        executor.shutdown(cancel=True)
    finally:
        for handle in handles:
            if handle.done() and handle.outcome()[1] is None:
                finish(con, handle)  # it finished before it could be stopped
        con.execute("UPDATE runs SET status = 'interrupted', error = 'interrupted by the user' "
                    "WHERE status = 'running' AND list_contains(?, run_id)", [run_ids])


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """End a transaction that an interrupt cut short, if there is one."""
    try:
        con.execute("ROLLBACK")
    except duckdb.TransactionException:
        pass


def finish(con: duckdb.DuckDBPyConnection, handle: Handle) -> str:
    """Ingest a finished task's files, or record why it failed."""
    result, error = handle.outcome()
    status = ingest_run(con, handle.task.run_dir, handle.task.run_id, fresh=False) if error is None else None
    if status is None:
        status = "failed"
        mark(con, handle.task.run_id, status, error or "the run ended without writing result.json")
    return status


def status_tables(con: duckdb.DuckDBPyConnection, sweep: str | None) -> dict[str, pd.DataFrame]:
    """Counts by status, failures with their first error line, slowest runs; for sweeps with branches, the FLOPs
    their points represent against those they spend (``scaling.branches``)."""
    if sweep and not con.execute("SELECT 1 FROM sweeps WHERE name = ?", [sweep]).fetchall():
        known = [name for (name,) in con.execute("SELECT name FROM sweeps ORDER BY name").fetchall()]
        raise StoreError(f"no sweep named {sweep!r} in this database "
                         f"({'sweeps: ' + ', '.join(known) if known else 'it has no sweeps yet'})")
    where, args = ("WHERE s.sweep = ?", [sweep]) if sweep else ("", [])
    base = f"FROM runs r JOIN sweep_runs s USING (run_id) {where}"
    branched = con.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'runs' "
                           "AND column_name = 'role'").fetchall()[0][0]  # a reader of an older file: no branches
    savings = pd.DataFrame() if not branched else con.execute(f"""
        SELECT s.sweep, count(*) FILTER (r.role = 'trunk') AS trunks, count(*) FILTER (r.role <> 'trunk') AS points,
            sum(r.flops) FILTER (r.role <> 'trunk') AS flops, sum(r.flops_spent) AS flops_spent,
            sum(r.flops_spent) / sum(r.flops) FILTER (r.role <> 'trunk') AS spent_frac
        {base} GROUP BY s.sweep HAVING count(*) FILTER (r.role = 'branch') > 0 ORDER BY s.sweep""", args).df()
    return {
        "counts": con.execute(f"SELECT s.sweep, r.status, count(*) AS runs, sum(r.flops) AS flops {base} "
                              "GROUP BY ALL ORDER BY ALL", args).df(),
        "failures": con.execute(f"SELECT s.sweep, r.run_id, r.status, r.attempts, "
                                f"split_part(r.error, chr(10), 1) AS error {base} "
                                f"{'AND' if where else 'WHERE'} r.status IN ('failed', 'diverged', 'interrupted') "
                                "ORDER BY ALL", args).df(),
        "slowest": con.execute(f"SELECT s.sweep, r.run_id, r.sparsity, r.active_params, r.flops, r.wall_s, "
                               f"r.tokens_per_s {base} {'AND' if where else 'WHERE'} r.wall_s IS NOT NULL "
                               "ORDER BY r.wall_s DESC LIMIT 5", args).df(),
        **({"savings": savings} if len(savings) else {}),  # planned FLOPs: points represent, trunks + branches spend
    }
