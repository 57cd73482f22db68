"""Sweeps that are killed, crash, get interrupted or preempted still end with every run ``ok`` exactly once.

End to end on the real smoke sweep (sweeps/smoke.toml, a checkpoint every 20 steps) and a real DuckDB file:
``scaling run`` in a subprocess where the driver is killed or interrupted, the Python API where a fault-injecting
task function goes through the real executor and runner. The Slurm test needs the local cluster of
scripts/local-slurm.sh (``make test`` starts it) and is skipped without one.

Every run gets one CPU thread, whatever the machine (as many local workers as cores, 1-CPU Slurm jobs), so that
the local and the Slurm sweep must reach the same losses.
"""

import fcntl
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from scaling.config import load_sweep
from scaling.executors import LocalExecutor, Task, available_cpus
from scaling.grid import plan
from scaling.runner import execute_locked, run_sweep
from scaling.store import connect

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "sweeps" / "smoke.toml"
WORKERS = max(2, available_cpus())  # one thread each
TIMEOUT_S = 300  # for one driver to finish the sweep; on 2 busy cores it takes well under a minute
STARTED = re.compile(r"starting run \w+: .*, (\d+) CPU thread\(s\)")
RESUMED = re.compile(r"resuming at step (\d+) run")


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shakespeare")]


def smoke_runs() -> list[tuple[str, int]]:
    """(run_id, steps) of the smoke sweep, longest first."""
    runs = plan(load_sweep(SMOKE)).runs.sort_values("steps", ascending=False)
    return list(zip(runs.run_id, runs.steps, strict=True))


def scaling_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("scaling")
    prefix = [str(script)] if script.exists() else [sys.executable, "-c", "from scaling.cli import main; main()"]
    return [*prefix, *args]


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Driver:
    """``scaling run sweeps/smoke.toml ARGS`` in a session of its own, as a terminal runs a command; its output
    goes to files (not a terminal: one line per finished run). ``sigint_ignored``: started as a shell script's
    background job is, with SIGINT ignored (which Python then keeps)."""

    def __init__(self, tmp_path: Path, name: str, *args: str, sigint_ignored: bool = False) -> None:
        self.name = name
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(scaling_command("run", str(SMOKE), *args), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, cwd=tmp_path, start_new_session=True,
                                         preexec_fn=ignore_sigint if sigint_ignored else None)

    def stderr(self) -> str:
        return self.err.read_text()

    def signal(self, sig: int) -> None:
        """To the driver's process group, as the terminal does (workers run in sessions of their own)."""
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            pytest.fail(f"{self.name}: the driver did not finish in {timeout}s\n{self.stderr()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait()


def wait_until(condition, what: str, driver: Driver | None = None, timeout: float = 120, poll: float = 0.02):
    """Poll ``condition`` until it returns something true, which is returned."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if driver is not None and driver.proc.poll() is not None:
            pytest.fail(f"the driver exited ({driver.proc.returncode}) before {what}:\n{driver.stderr()[-3000:]}")
        if time.monotonic() > deadline:
            tail = f":\n{driver.stderr()[-3000:]}" if driver is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(poll)
    return value


def runs_table(db: Path) -> dict[str, dict]:
    """The smoke sweep's rows of ``runs`` with their metrics row counts, read-only."""
    con = connect(db, read_only=True)
    try:
        frame = con.execute("""
            SELECT r.*, (SELECT count(*) FROM metrics m WHERE m.run_id = r.run_id) AS metric_rows,
                   (SELECT count(DISTINCT step) FROM metrics m WHERE m.run_id = r.run_id) AS metric_steps
            FROM runs r JOIN sweep_runs s USING (run_id) WHERE s.sweep = 'smoke'""").df()
    finally:
        con.close()
    assert frame.run_id.is_unique
    return {row["run_id"]: row for row in frame.to_dict("records")}


def log(runs_dir: Path, run_id: str) -> str:
    return (runs_dir / run_id / "log.txt").read_text()


def assert_all_ok(table: dict[str, dict], runs_dir: Path) -> None:
    """Every planned run ``ok`` once, its metrics exactly the rows of its result.json (none twice)."""
    assert sorted(table) == sorted(run_id for run_id, _ in smoke_runs())
    for run_id, row in table.items():
        assert row["status"] == "ok" and row["error"] is None, row
        result = json.loads((runs_dir / run_id / "result.json").read_text())
        assert row["metric_rows"] == row["metric_steps"] == len(result["metrics"]) > 0, row
        assert row["final_eval_loss"] == result["final_eval_loss"]


def one_thread_each(runs_dir: Path, run_ids) -> None:
    for run_id in run_ids:
        threads = {int(t) for t in STARTED.findall(log(runs_dir, run_id))}
        assert threads == {1}, f"{run_id}: {log(runs_dir, run_id)}"


# ------------------------------------------------------------------------------------------------------------
# The driver is killed


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory):
    """Run the sweep, SIGKILL the driver right after it has ingested its first run, run it again."""
    tmp = tmp_path_factory.mktemp("killed")
    db, runs = tmp / "results.duckdb", tmp / "runs"
    args = ("--workers", str(WORKERS), "--db", str(db), "--runs-dir", str(runs))
    first = Driver(tmp, "first", *args)
    try:
        # the driver prints "[1/6] RUN_ID ok" once it has ingested the run
        wait_until(lambda: re.search(r"^\[1/6\] \w+ ok$", first.stderr(), re.M), "the first run's ingest", first)
        first.signal(signal.SIGKILL)
        first.proc.wait()
    finally:
        first.stop()
    finished = {}
    for run_dir in runs.iterdir():
        result = run_dir / "result.json"
        if result.exists():
            finished[run_dir.name] = (result.stat().st_mtime_ns, json.loads(result.read_text())["finished_at"])
    second = Driver(tmp, "second", *args)
    try:
        code = second.wait()
    finally:
        second.stop()
    return SimpleNamespace(db=db, runs=runs, finished=finished, code=code, stderr=second.stderr())


def test_killed_driver_rerun_trains_every_run_exactly_once(killed_and_rerun):
    k = killed_and_rerun
    assert k.code == 0, k.stderr
    assert 1 <= len(k.finished) < 6, f"the kill should leave runs in flight: {k.finished}"
    table = runs_table(k.db)
    assert_all_ok(table, k.runs)
    # runs finished before the kill were not trained again: their files are untouched
    for run_id, (mtime_ns, finished_at) in k.finished.items():
        result = k.runs / run_id / "result.json"
        assert result.stat().st_mtime_ns == mtime_ns, run_id
        assert json.loads(result.read_text())["finished_at"] == finished_at
    # and no run was trained twice: the orphaned workers finished theirs while the rerun waited on their locks
    for run_id in table:
        text = log(k.runs, run_id)
        assert len(STARTED.findall(text)) == 1 and not RESUMED.search(text), f"{run_id}:\n{text}"
    one_thread_each(k.runs, table)
    assert re.search(r"smoke: .*\d+ already done", k.stderr), k.stderr


def test_losses_do_not_depend_on_the_number_of_workers(killed_and_rerun, tmp_path):
    """One worker on this machine's cores trains the two shortest smoke runs to the very losses that one-thread
    workers side by side reached: the thread count is the run's (1), not cores / workers."""
    shortest = [run_id for run_id, _ in smoke_runs()[-2:]]
    runs = {r["run_id"]: r for r in plan(load_sweep(SMOKE)).runs.to_dict("records")}
    executor = LocalExecutor(workers=1, fn=execute_locked)
    try:
        handles = executor.submit([Task(run_id=r, spec=runs[r]["spec"].to_dict(), run_dir=str(tmp_path / r))
                                   for r in shortest])
        outcomes = {h.task.run_id: h.outcome() for h in handles}
    finally:
        executor.shutdown(cancel=True)
    side_by_side = runs_table(killed_and_rerun.db)
    for run_id, (result, error) in outcomes.items():
        assert error is None and result["threads"] == 1, error
        assert result["final_eval_loss"] == side_by_side[run_id]["final_eval_loss"], run_id
        assert result["final_train_loss"] == side_by_side[run_id]["final_train_loss"], run_id


# ------------------------------------------------------------------------------------------------------------
# Workers crash


def faulty(faults: dict[str, str], spec: dict, run_dir: str) -> dict:
    """The sweep's task (``execute_locked``), except that the first attempt of the runs in ``faults`` fails:
    "raise" raises before training; "exit" ends the worker process (``os._exit(3)``) once the run has written its
    first checkpoint."""
    path = Path(run_dir)
    fault, marker = faults.get(path.name), path / "fault-injected"
    if fault and not marker.exists():
        path.mkdir(parents=True, exist_ok=True)
        marker.touch()
        if fault == "raise":
            raise RuntimeError(f"injected fault in {path.name}")
        threading.Thread(target=exit_after_checkpoint, args=(path,), daemon=True).start()
    return execute_locked(spec, run_dir)


def exit_after_checkpoint(path: Path) -> None:
    while not (path / "checkpoint.pt").exists():
        time.sleep(0.002)
    os._exit(3)


def test_crashed_runs_are_recorded_failed_and_retried(tmp_path):
    (dies, _), *_, (raises, _) = smoke_runs()  # the longest run dies mid-way, the shortest raises
    executor = LocalExecutor(workers=WORKERS, fn=functools.partial(faulty, {dies: "exit", raises: "raise"}))
    con = connect(tmp_path / "results.duckdb")
    failures = {}

    def on_update(event: dict) -> None:  # the store as the driver left it when each failure came in
        if event["event"] == "retry":
            failures[event["run_id"]] = con.execute("SELECT status, error, attempts FROM runs WHERE run_id = ?",
                                                    [event["run_id"]]).fetchall()[0]

    try:
        outcome = run_sweep(con, load_sweep(SMOKE), executor, tmp_path / "runs", retries=1, on_update=on_update)
    finally:
        executor.shutdown(cancel=True)
        con.close()

    assert sorted(failures) == sorted([dies, raises])
    status, error, attempts = failures[raises]
    assert (status, attempts) == ("failed", 1) and error.splitlines()[0] == f"RuntimeError: injected fault in {raises}"
    assert "Traceback" in error  # the rest of the error is the traceback
    status, error, attempts = failures[dies]
    assert (status, attempts) == ("failed", 1) and error.splitlines()[0] == "worker process died (exit code 3)"

    assert outcome.counts == {"ok": 6} and not outcome.interrupted and outcome.failed == 0
    table = runs_table(tmp_path / "results.duckdb")
    assert_all_ok(table, tmp_path / "runs")
    assert {r: row["attempts"] for r, row in table.items()} == {r: 1 + (r in (dies, raises)) for r in table}
    # the retry of the run that died continued from its checkpoint
    resumed = RESUMED.findall(log(tmp_path / "runs", dies))
    assert len(resumed) == 1 and int(resumed[0]) >= 20, log(tmp_path / "runs", dies)


# ------------------------------------------------------------------------------------------------------------
# Preemption inside the trainer


def test_trainer_lets_system_exit_through_and_resumes(tmp_path, monkeypatch):
    """submitit ends a preempted or timed-out job with SystemExit from its SIGUSR2 handler, wherever training
    is: the trainer must let it through without writing a result, and the requeued job resumes from the last
    checkpoint to the same losses as an uninterrupted run."""
    import torch

    from scaling import train
    from scaling.config import RunSpec

    monkeypatch.setenv("SCALING_THREADS", "1")  # the executors' thread count reaches the trainer
    runs = plan(load_sweep(SMOKE)).runs
    spec: RunSpec = runs.sort_values("steps").spec.iloc[0]  # 66 steps, a checkpoint every 20
    step = train.Run.step

    def preempted_at_30(self, s):
        if s == 30:
            assert torch.get_num_threads() == 1
            raise SystemExit(-1)
        return step(self, s)

    with monkeypatch.context() as m:
        m.setattr(train.Run, "step", preempted_at_30)
        with pytest.raises(SystemExit):
            train.train_run(spec, tmp_path / "preempted")
    assert not (tmp_path / "preempted" / "result.json").exists()
    assert (tmp_path / "preempted" / "checkpoint.pt").exists()
    resumed = train.train_run(spec, tmp_path / "preempted")
    assert RESUMED.findall((tmp_path / "preempted" / "log.txt").read_text()) == ["20"]
    straight = train.train_run(spec, tmp_path / "straight")
    assert resumed["status"] == straight["status"] == "ok"
    assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], abs=1e-6)


def test_preemption_signal_checkpoints_where_the_run_is(tmp_path, monkeypatch):
    """SIGUSR2 (Slurm's warning before preemption or timeout) mid-step: the trainer finishes the step, checkpoints
    there, then hands the signal to the handler that was installed before it (submitit's, which requeues and
    exits: here one that exits); the requeued run resumes from that step, not from the last periodic checkpoint,
    to the same losses as an uninterrupted run."""
    from scaling import train
    from scaling.config import RunSpec

    monkeypatch.setenv("SCALING_THREADS", "1")
    spec: RunSpec = plan(load_sweep(SMOKE)).runs.sort_values("steps").spec.iloc[0]  # 66 steps, checkpoints every 20
    step = train.Run.step

    def signalled_at_30(self, s):
        if s == 30:
            os.kill(os.getpid(), signal.SIGUSR2)  # arrives while step 30 runs
        return step(self, s)

    def requeue(signum, frame):
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        with monkeypatch.context() as m:
            m.setattr(train.Run, "step", signalled_at_30)
            with pytest.raises(SystemExit):
                train.train_run(spec, tmp_path / "preempted")
        assert signal.getsignal(signal.SIGUSR2) is requeue  # the trainer's hold is gone
    finally:
        signal.signal(signal.SIGUSR2, previous)
    run_log = (tmp_path / "preempted" / "log.txt").read_text()
    assert "checkpointed at step 31 on SIGUSR2" in run_log and not (tmp_path / "preempted" / "result.json").exists()
    resumed = train.train_run(spec, tmp_path / "preempted")
    assert RESUMED.findall((tmp_path / "preempted" / "log.txt").read_text()) == ["31"]
    straight = train.train_run(spec, tmp_path / "straight")
    assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], abs=1e-6)


def test_signals_held_to_the_end_of_the_run_and_in_order(tmp_path, monkeypatch):
    """A stop signal during the last step reaches its handler after result.json is written; two signals in one
    step (SIGUSR2 then SIGTERM, which submitit ignores) are both delivered, in order, so the requeue happens."""
    from scaling import train
    from scaling.config import RunSpec

    monkeypatch.setenv("SCALING_THREADS", "1")
    spec: RunSpec = plan(load_sweep(SMOKE)).runs.sort_values("steps").spec.iloc[0]
    step = train.Run.step
    received: list[str] = []

    def requeue(signum, frame):
        received.append(signal.Signals(signum).name)
        raise SystemExit(-1)

    def ignore(signum, frame):
        received.append(signal.Signals(signum).name)

    def signalled(at: int, *sigs: signal.Signals):
        def run_step(self, s):
            if s == at:
                for sig in sigs:
                    os.kill(os.getpid(), sig)
            return step(self, s)
        return run_step

    previous = signal.signal(signal.SIGUSR2, requeue), signal.signal(signal.SIGTERM, ignore)
    try:
        with monkeypatch.context() as m:
            m.setattr(train.Run, "step", signalled(spec.steps - 1, signal.SIGUSR2))
            with pytest.raises(SystemExit):
                train.train_run(spec, tmp_path / "last")
        assert json.loads((tmp_path / "last" / "result.json").read_text())["status"] == "ok"
        with monkeypatch.context() as m:
            m.setattr(train.Run, "step", signalled(30, signal.SIGUSR2, signal.SIGTERM))
            with pytest.raises(SystemExit):
                train.train_run(spec, tmp_path / "two")
        assert received == ["SIGUSR2", "SIGUSR2"]  # the requeue ended the run before SIGTERM's turn
        assert "checkpointed at step 31 on SIGUSR2" in (tmp_path / "two" / "log.txt").read_text()
    finally:
        signal.signal(signal.SIGUSR2, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


# ------------------------------------------------------------------------------------------------------------
# Ctrl-C


def lock_is_free(run_dir: Path) -> bool:
    """Whether no worker holds the run's lock (workers train under it)."""
    with open(run_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
    return True


def test_ctrl_c_marks_running_runs_interrupted_and_says_how_to_resume(tmp_path):
    """The driver starts with SIGINT ignored, as under ``make test &``: it still stops on Ctrl-C (it installs its
    own handler), whatever it is doing when the signal lands."""
    db, runs = tmp_path / "results.duckdb", tmp_path / "runs"
    args = ("--workers", str(WORKERS), "--db", str(db), "--runs-dir", str(runs))
    longest = [run_id for run_id, _ in smoke_runs()[:2]]  # trained first, side by side
    driver = Driver(tmp_path, "interrupted", *args, sigint_ignored=True)
    try:
        wait_until(lambda: any((runs / r / "checkpoint.pt").exists() for r in longest), "a checkpoint", driver)
        driver.signal(signal.SIGINT)
        code = driver.wait(60)
    finally:
        driver.stop()
    stderr = driver.stderr()
    assert code == 130, stderr
    assert re.search(r"^interrupted: finished runs are stored; rerun `scaling run \S*smoke.toml` with the same "
                     r"options to resume", stderr, re.M), stderr
    assert "Traceback" not in stderr
    table = runs_table(db)
    interrupted = sorted(r for r, row in table.items() if row["status"] == "interrupted")
    assert interrupted and {row["status"] for row in table.values()} <= {"ok", "interrupted", "planned"}, table
    assert all(table[r]["error"] == "interrupted by the user" for r in interrupted)
    assert all(lock_is_free(runs / r) for r in interrupted if (runs / r).exists())  # their workers were stopped
    with_checkpoint = [r for r in interrupted if (runs / r / "checkpoint.pt").exists()]
    assert with_checkpoint

    rerun = Driver(tmp_path, "resumed", *args)
    try:
        assert rerun.wait() == 0, rerun.stderr()
    finally:
        rerun.stop()
    assert_all_ok(runs_table(db), runs)
    for run_id in with_checkpoint:  # stopped by the driver's SIGTERM: checkpointed where they were, resumed there
        resumed = RESUMED.findall(log(runs, run_id))
        held = re.findall(r"checkpointed at step (\d+) on SIGTERM", log(runs, run_id))
        assert len(resumed) == 1 and resumed == held, log(runs, run_id)


# ------------------------------------------------------------------------------------------------------------
# Slurm


@pytest.fixture(scope="module")
def slurm_cluster():
    from test_slurm import cluster_problem

    problem = cluster_problem()
    if problem:
        pytest.skip(f"needs a Slurm cluster, e.g. `sudo scripts/local-slurm.sh start`: {problem}")


def squeue_state(job_id: str) -> str:
    proc = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%T"], capture_output=True,
                          text=True, timeout=60)
    return proc.stdout.strip() or "GONE"


def read_jobs(jobs_file: Path) -> dict[str, str]:
    """run_id → Slurm job id, from the executor's jobs.json."""
    try:
        return {run_id: job["job_id"] for run_id, job in json.loads(jobs_file.read_text()).items()}
    except (OSError, ValueError):
        return {}


STOPPING = ("RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "REQUEUED")


def preempt_mid_run(runs: Path, jobs: dict[str, str], driver: Driver) -> tuple[str, list[str]]:
    """Send SIGUSR2, Slurm's warning before preemption or the time limit, to a job whose run has written a
    checkpoint and not finished. The trainer checkpoints at the end of its step, then submitit's handler requeues
    the job and exits the task (SystemExit through the trainer). A run may finish before the signal lands; then
    the next one is tried. Returns the preempted run and every job signalled (all requeued: Slurm holds requeued
    jobs for a while, see ``release``)."""
    signalled: list[str] = []
    tried: set[str] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(tried) < len(jobs):
        for run_id, job_id in jobs.items():
            run_dir = runs / run_id
            if run_id in tried or not (run_dir / "checkpoint.pt").exists() or (run_dir / "result.json").exists():
                continue
            tried.add(run_id)
            # not waited for: once the job is requeued, scancel retries ("Job can not be altered now") for minutes
            scancel = subprocess.Popen(["scancel", "--signal=USR2", job_id], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            signalled.append(job_id)
            try:
                state = wait_until(lambda j=job_id: (s := squeue_state(j)) not in STOPPING and s,
                                   f"job {job_id} to stop", driver, timeout=60, poll=0.1)
            finally:
                scancel.kill()
                scancel.wait()
            if state == "PENDING" and not (run_dir / "result.json").exists():
                return run_id, signalled
        time.sleep(0.01)
    pytest.fail(f"could not catch a run between its checkpoint and its end (tried {sorted(tried)})")


def release(job_id: str) -> None:
    """Slurm holds a requeued job for about two minutes (BeginTime); let it start at once."""
    wait_until(lambda: squeue_state(job_id) != "REQUEUED", f"job {job_id} to be pending", timeout=30, poll=0.1)
    if squeue_state(job_id) == "PENDING":
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, check=True)


@pytest.mark.slurm
def test_slurm_sweep_matches_local_and_survives_preemption_and_restart(slurm_cluster, killed_and_rerun, tmp_path):
    """The smoke sweep on Slurm: one run is preempted after a checkpoint, the driver is SIGKILLed meanwhile and
    started again. The new driver attaches to the jobs in flight (nothing is submitted twice), the preempted run
    resumes from its checkpoint, and every final loss equals the local executor's."""
    db, runs = tmp_path / "results.duckdb", tmp_path / "runs"
    args = ("--executor", "slurm", "--cpus-per-task", "1", "--time-min", "10", "--db", str(db),
            "--runs-dir", str(runs))
    jobs_file = runs / "_slurm" / "jobs.json"
    first = Driver(tmp_path, "slurm-first", *args)
    second = None
    try:
        jobs = wait_until(lambda: (j := read_jobs(jobs_file)) and len(j) == 6 and j, "the jobs.json of 6 runs",
                          first)
        preempted, signalled = preempt_mid_run(runs, jobs, first)
        first.signal(signal.SIGKILL)
        first.proc.wait()
        for job_id in signalled:
            release(job_id)
        second = Driver(tmp_path, "slurm-second", *args)
        assert second.wait() == 0, second.stderr()
    finally:
        for driver in (first, second):
            if driver is not None:
                driver.stop()
        left = list(read_jobs(jobs_file).values())
        if left:
            subprocess.run(["scancel", *left], capture_output=True)

    assert read_jobs(jobs_file) == jobs  # the restarted driver attached to the jobs in flight
    table = runs_table(db)
    assert_all_ok(table, runs)
    one_thread_each(runs, table)
    text = log(runs, preempted)
    resumed = RESUMED.findall(text)
    held = re.findall(r"checkpointed at step (\d+) on SIGUSR2", text)  # where the signal found it, not step 20
    assert len(resumed) == 1 and resumed == held, text
    local = runs_table(killed_and_rerun.db)
    for run_id, row in table.items():
        for column in ("final_eval_loss", "final_train_loss"):
            assert abs(row[column] - local[run_id][column]) <= 1e-5, (run_id, column, row[column], local[run_id])
