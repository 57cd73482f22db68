"""The driver's bookkeeping with a scripted executor: attempts, retries, what counts as done, progress events.

The runs' files are the synthetic ones of ``synthetic.write_run`` (as the trainer writes them) and the store is a
real DuckDB file; only the executor is scripted, so that every path through the retry logic is exercised in
milliseconds. The reliability tests do the same with real training and real crashes.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from synthetic import POSITIONS, SMALL, write_run

from scaling.config import parse_sweep
from scaling.executors import Task
from scaling.grid import plan
from scaling.runner import run_sweep
from scaling.store import connect

SWEEP = parse_sweep(SMALL)
RUNS = {run["run_id"]: run for run in plan(SWEEP).runs.to_dict("records")}


@dataclass
class Scripted:
    """Each submission of a run takes the next action of its script ("ok", "fail" or "ctrl-c"); runs without a
    script succeed."""

    scripts: dict[str, list[str]]
    submitted: list[str] = field(default_factory=list)

    def submit(self, tasks: list[Task]) -> list:
        self.submitted += [t.run_id for t in tasks]
        return [Done(t, (self.scripts.get(t.run_id) or ["ok"]).pop(0)) for t in tasks]

    def attach(self, tasks: list[Task]) -> list:
        return []

    def shutdown(self, cancel: bool) -> None:
        pass


@dataclass
class Done:
    task: Task
    action: str

    def done(self) -> bool:
        if self.action == "ctrl-c":
            self.action = "interrupted"
            raise KeyboardInterrupt
        return self.action != "interrupted"

    def outcome(self) -> tuple[dict | None, str | None]:
        if self.action == "fail":
            return None, "RuntimeError: scripted failure"
        rng = np.random.default_rng(0)
        write_run(Path(self.task.run_dir), RUNS[self.task.run_id], rng, rng.gamma(2.0, 1.0, POSITIONS))
        return {"status": "ok"}, None


def attempts(db: Path, run_id: str) -> tuple[str, int]:
    con = connect(db, read_only=True)
    try:
        return con.execute("SELECT status, attempts FROM runs WHERE run_id = ?", [run_id]).fetchall()[0]
    finally:
        con.close()


def sweep_pass(db: Path, executor: Scripted, retries: int = 1, events: list | None = None):
    con = connect(db)
    try:
        return run_sweep(con, SWEEP, executor, db.parent / "runs", retries=retries, poll_s=0,
                         on_update=(events.append if events is not None else None))
    finally:
        con.close()


def test_resuming_an_interrupted_run_continues_its_attempt(tmp_path):
    """Ctrl-C, then a failure: the failure is the run's first attempt, so --retries 1 still retries it."""
    db = tmp_path / "results.duckdb"
    victim = next(iter(RUNS))
    first = sweep_pass(db, Scripted({victim: ["ctrl-c"]}))
    assert first.interrupted and attempts(db, victim) == ("interrupted", 1)

    executor = Scripted({victim: ["fail", "fail"]})
    events: list[dict] = []
    second = sweep_pass(db, executor, events=events)
    assert executor.submitted.count(victim) == 2 and attempts(db, victim) == ("failed", 2)
    assert second.counts["failed"] == 1 and second.failed == 1
    assert [e["event"] for e in events if e.get("run_id") == victim] == ["retry", "done"]
    done = [e for e in events if e["event"] == "done"]
    start = events[0]
    assert start["done"] + len(done) == start["total"] == len(RUNS)  # progress never passes the total


def test_failed_runs_out_of_retries_are_not_counted_done(tmp_path):
    db = tmp_path / "results.duckdb"
    victim = next(iter(RUNS))
    sweep_pass(db, Scripted({victim: ["fail", "fail"]}), retries=1)
    assert attempts(db, victim) == ("failed", 2)
    executor = Scripted({})
    again = sweep_pass(db, executor, retries=1)
    assert executor.submitted == [] and again.counts == {}
    assert (again.skipped, again.exhausted, again.failed) == (len(RUNS) - 1, 1, 1)
    more = sweep_pass(db, executor, retries=2)  # a larger --retries tries it again
    assert executor.submitted == [victim] and more.counts == {"ok": 1} and more.failed == 0


def test_dry_run_reads_the_store_and_writes_nothing(tmp_path):
    from scaling.runner import dry_run

    db = tmp_path / "results.duckdb"
    fresh = dry_run(str(db), SWEEP, retries=1)
    assert not db.exists() and sorted(fresh.run_id) == sorted(RUNS) and set(fresh.status) == {"planned"}
    assert (fresh.est_seconds > 0).all()
    victim = next(iter(RUNS))
    sweep_pass(db, Scripted({victim: ["fail", "fail"]}), retries=1)
    before = db.stat().st_mtime_ns
    assert dry_run(str(db), SWEEP, retries=1).empty  # the failed run has used its retries
    again = dry_run(str(db), SWEEP, retries=2)
    assert list(again.run_id) == [victim] and list(again.status) == ["failed"]
    assert db.stat().st_mtime_ns == before


def test_ctrl_c_while_planning_stores_nothing_half_done(tmp_path, monkeypatch):
    from scaling import runner

    db = tmp_path / "results.duckdb"

    def interrupted(con, sweep, runs_dir):
        con.execute("BEGIN")
        con.execute("INSERT INTO sweeps VALUES ('half', '', '{}', now(), 0)")
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "prepare", interrupted)
    executor = Scripted({})
    con = connect(db)
    try:
        outcome = run_sweep(con, SWEEP, executor, tmp_path / "runs", poll_s=0)
        assert outcome.interrupted and executor.submitted == []
        # the driver's connection is usable and the half-written plan is gone (not merely uncommitted)
        assert con.execute("SELECT count(*) FROM sweeps").fetchall()[0][0] == 0
        con.execute("BEGIN")
        con.execute("ROLLBACK")
    finally:
        con.close()


def sigint_during_a_query(con) -> None:
    """Ctrl-C while DuckDB runs a query of the driver: the signal is sent from inside the query (a UDF, run by the
    calling thread, as a short query of the driver is)."""
    con.execute("SET threads = 1")
    con.create_function("sigint_now", lambda: os.kill(os.getpid(), signal.SIGINT) or 1, [], "INTEGER",
                        side_effects=True)
    con.execute("SELECT sigint_now()").fetchall()
    con.remove_function("sigint_now")
    con.execute("RESET threads")


@pytest.mark.parametrize("phase", ["ingest_all", "mark", "ingest_run"])  # planning, submitting, collecting
def test_ctrl_c_during_a_duckdb_query_stops_the_sweep(tmp_path, monkeypatch, phase):
    """DuckDB's client turns a KeyboardInterrupt raised during a query into its own error; the driver must still
    stop cleanly: nothing left ``running``, and a rerun finishes the sweep."""
    from scaling import runner

    db = tmp_path / "results.duckdb"
    original, fired = getattr(runner, phase), []

    def interrupted(con, *args, **kwargs):
        result = original(con, *args, **kwargs)
        if not fired:
            fired.append(phase)
            sigint_during_a_query(con)
        return result

    monkeypatch.setattr(runner, phase, interrupted)
    executor = Scripted({})
    before = signal.getsignal(signal.SIGINT)  # default, or ignored when pytest itself runs as a background job
    outcome = sweep_pass(db, executor)
    assert fired and outcome.interrupted
    assert signal.getsignal(signal.SIGINT) is before  # the driver's handler is gone
    con = connect(db, read_only=True)
    try:
        statuses = dict(con.execute("SELECT status, count(*) FROM runs GROUP BY ALL").fetchall())
    finally:
        con.close()
    assert "running" not in statuses, statuses  # (the scripted runs that finished meanwhile are ingested)
    if phase == "ingest_all":
        assert executor.submitted == []  # stopped before anything was submitted
    monkeypatch.undo()
    again = sweep_pass(db, Scripted({}))
    assert not again.interrupted and again.skipped + again.counts.get("ok", 0) == len(RUNS)


def test_ctrl_c_is_honoured_when_started_with_sigint_ignored(tmp_path):
    """A shell script's background job (``scaling run ... &``) starts with SIGINT ignored, and Python keeps it
    ignored: the driver must still stop on it (under ``make test`` run as a background job, the end-to-end Ctrl-C
    test trained the whole sweep and exited 0)."""
    sent = []

    def ctrl_c_at_first_tick(event: dict) -> None:
        if event["event"] == "tick" and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        con = connect(tmp_path / "results.duckdb")
        try:
            outcome = run_sweep(con, SWEEP, Scripted({}), tmp_path / "runs", poll_s=0, on_update=ctrl_c_at_first_tick)
        finally:
            con.close()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # what the process had is restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent and outcome.interrupted


def test_a_damaged_result_is_trained_again_by_the_next_sweep(tmp_path):
    db = tmp_path / "results.duckdb"
    sweep_pass(db, Scripted({}))
    victim = next(iter(RUNS))
    (tmp_path / "runs" / victim / "result.json").write_text(json.dumps({"run_id": victim, "status": "ok"}))
    executor = Scripted({})
    again = sweep_pass(db, executor, retries=0)  # a damaged file is not an attempt of the run's
    assert executor.submitted == [victim] and again.counts == {"ok": 1} and again.failed == 0
    assert attempts(db, victim) == ("ok", 1)


def test_a_run_whose_worker_never_started_keeps_its_attempts(tmp_path):
    """An unusable runs directory (here a file where it should be; read-only is the same for the executor)
    fails every run before a worker starts: no attempt is used, nothing is retried in a loop, and the advice
    is to rerun (once the directory is fixed), not to raise --retries."""
    from scaling.executors import LocalExecutor
    from scaling.runner import failure_advice

    db = tmp_path / "results.duckdb"
    (tmp_path / "runs").write_text("not a directory")
    executor = LocalExecutor(workers=2)
    con = connect(db)
    try:
        outcome = run_sweep(con, SWEEP, executor, tmp_path / "runs", retries=1, poll_s=0.01)
        rows = con.execute("SELECT status, attempts, error FROM runs").fetchall()
        advice = failure_advice(con, SWEEP.name, 1, "scaling run small.toml")
    finally:
        executor.shutdown(cancel=True)
        con.close()
    assert outcome.failed == len(RUNS) and outcome.counts == {"failed": len(RUNS)}
    assert {(status, attempts) for status, attempts, _ in rows} == {("failed", 0)}
    assert all(error.startswith("could not start a worker process: ") for _, _, error in rows)
    assert advice == (f"{len(RUNS)} run(s) failed: `scaling status small` shows why; {len(RUNS)} will be tried "
                      "again by rerunning `scaling run small.toml`")


def test_failure_advice_names_runs_out_of_retries(tmp_path):
    from scaling.runner import failure_advice

    db = tmp_path / "results.duckdb"
    victim = next(iter(RUNS))
    sweep_pass(db, Scripted({victim: ["fail", "fail"]}), retries=1)
    con = connect(db)
    try:
        assert failure_advice(con, "small", 1, "scaling run small.toml") == (
            "1 run(s) failed: `scaling status small` shows why; 1 used up --retries 1: once the cause is fixed, "
            "rerun with --retries 2")
    finally:
        con.close()
