"""SlurmExecutor against a real Slurm: the local single-node cluster of scripts/local-slurm.sh.

Skipped when no cluster answers. As root with the Slurm packages installed, the fixture starts the local
cluster itself (and stops it afterwards); CI starts it beforehand.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from scaling.executors import SlurmExecutor, Task

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "local-slurm.sh"
TIMEOUT_S = 240  # for one test's jobs to finish; the 2-CPU local cluster needs well under a minute


def cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None when a cluster has a usable node."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm client commands (sinfo, sbatch) are not installed"
    try:
        proc = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True,
                              timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return f"no Slurm controller answers ({last})"
    if not {"idle", "mixed", "allocated"} & set(proc.stdout.split()):
        return f"no usable Slurm node (states: {' '.join(proc.stdout.split()) or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = cluster_problem()
    started = False
    if problem and os.geteuid() == 0 and shutil.which("slurmctld") and SCRIPT.exists():
        proc = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.skip(f"{SCRIPT.name} start failed:\n{proc.stderr[-2000:]}")
        started = True
        problem = cluster_problem()
    if problem:
        pytest.skip(problem)
    # The task functions below travel by value, so jobs need not import this test module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    if started:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)


def quick(spec: dict, run_dir: str) -> dict:
    """Write a result like the trainer does, or fail as ``spec["action"]`` says."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    if spec.get("action") == "raise":
        raise ValueError(f"bad spec {spec['name']}")
    if spec.get("action") == "exit":
        os._exit(3)
    time.sleep(spec.get("sleep", 0))
    result = {"run_id": spec["name"], "status": "ok", "threads": os.environ.get("SCALING_THREADS"),
              "allocated": os.environ.get("SLURM_CPUS_ON_NODE"), "cwd": os.getcwd()}
    (path / "result.json").write_text(json.dumps(result))
    return result


def count(spec: dict, run_dir: str) -> dict:
    """Count to ``spec["steps"]``, one step per ``spec["step_s"]``, checkpointing each step to checkpoint.json
    and resuming from it, as the trainer does with checkpoint.pt."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    checkpoint = path / "checkpoint.json"
    step = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
    resumed_from = step
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    with open(path / "progress.log", "a") as log:
        print(f"start at step {step} (restart {restart})", file=log, flush=True)
    while step < spec["steps"]:
        time.sleep(spec["step_s"])
        step += 1
        tmp = path / "checkpoint.json.tmp"
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, checkpoint)
    result = {"run_id": spec["name"], "status": "ok", "resumed_from": resumed_from,
              "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}
    (path / "result.json").write_text(json.dumps(result))
    return result


def make_tasks(tmp_path: Path, *specs: dict) -> list[Task]:
    return [Task(run_id=s["name"], spec=s, run_dir=str(tmp_path / "runs" / s["name"])) for s in specs]


def diagnostics(handles) -> str:
    queue = subprocess.run(["squeue", "--all"], capture_output=True, text=True).stdout
    logs = "\n".join(f"--- {h.job_id}:\n{h.job.stderr() or ''}\n{h.job.stdout() or ''}" for h in handles)
    return f"squeue:\n{queue}\n{logs}"


def wait_done(handles, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not all(h.done() for h in handles):
        if time.monotonic() > deadline:
            pytest.fail(f"jobs not done after {timeout}s\n{diagnostics(handles)}")
        time.sleep(0.5)


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%T %r"], capture_output=True,
                         text=True).stdout.strip()
    return out or "GONE"


def wait_for(condition, what: str, handles, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{diagnostics(handles)}")
        time.sleep(0.2)


def release_when_requeued(handle) -> None:
    """Slurm holds a requeued job for ~2 minutes (BeginTime); let it start again at once."""
    job_id = handle.job_id
    wait_for(lambda: job_state(job_id).startswith("PENDING"), f"{job_id} to be requeued", [handle])
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def test_array_of_tasks_runs_and_reattaches(slurm, tmp_path):
    folder = tmp_path / "slurm"
    executor = SlurmExecutor(folder, time_min=10, max_parallel=2, fn=quick, poll_s=1)
    specs = [{"name": "a", "sleep": 2}, {"name": "b", "sleep": 2}, {"name": "c"},
             {"name": "bad", "action": "raise"}, {"name": "dies", "action": "exit"}]
    tasks = make_tasks(tmp_path, *specs)
    handles = executor.submit(tasks)
    assert len({h.job_id.split("_")[0] for h in handles}) == 1  # one job array

    # a restarted driver finds the runs still in flight instead of submitting them again
    again = SlurmExecutor(folder, time_min=10, fn=quick, poll_s=1)
    unknown = make_tasks(tmp_path / "other", {"name": "never-submitted"})
    attached = again.attach(tasks + unknown)
    assert sorted(h.task.run_id for h in attached) == sorted(t.run_id for t in tasks)
    assert json.loads((folder / "jobs.json").read_text())["a"]["job_id"] == handles[0].job_id

    wait_done(handles)
    outcomes = {h.task.run_id: h.outcome() for h in handles}
    for name in ("a", "b", "c"):
        result, error = outcomes[name]
        assert error is None, error
        assert result["run_id"] == name and result["cwd"] == os.getcwd()
        assert result["threads"] == result["allocated"]  # 1 CPU, or 1 core's threads where CR_Core
        assert (tmp_path / "runs" / name / "result.json").exists()
    assert outcomes["bad"][0] is None and outcomes["bad"][1].splitlines()[0] == "ValueError: bad spec bad"
    result, error = outcomes["dies"]
    assert result is None and "ended without a result (FAILED, exit code 3" in error.splitlines()[0]

    wait_done(attached)
    assert {h.task.run_id: h.outcome() for h in attached} == outcomes
    # finished jobs are no longer in flight, except those whose result nobody has collected yet
    assert sorted(h.task.run_id for h in again.attach(tasks)) == ["a", "b", "bad", "c"]


def test_preempted_jobs_resume_from_their_checkpoint(slurm, tmp_path):
    """Two ways a job gets requeued: Slurm kills it (``scontrol requeue``, as on preemption), or submitit's
    SIGUSR2 handler checkpoints and requeues it (``job._interrupt()``). Either way the task starts again and
    continues from its own checkpoint."""
    executor = SlurmExecutor(tmp_path / "slurm", time_min=20, fn=count, poll_s=1)
    spec = {"steps": 20, "step_s": 0.5}
    handles = executor.submit(make_tasks(tmp_path, {"name": "killed", **spec}, {"name": "signalled", **spec}))
    killed, signalled = handles

    def progressed(handle, steps: int = 3) -> bool:
        checkpoint = Path(handle.task.run_dir) / "checkpoint.json"
        return checkpoint.exists() and json.loads(checkpoint.read_text())["step"] >= steps

    # One after the other, so that this works on a 1-CPU node too (there the second starts once the first
    # is requeued).
    wait_for(lambda: progressed(killed), "the first task to make progress", handles)
    subprocess.run(["scontrol", "requeue", killed.job_id], check=True)
    wait_for(lambda: progressed(signalled), "the second task to make progress", handles)
    signalled.job._interrupt()
    release_when_requeued(killed)
    release_when_requeued(signalled)

    wait_done(handles)
    for handle in handles:
        result, error = handle.outcome()
        assert error is None, f"{error}\n{diagnostics([handle])}"
        assert result["restarts"] >= 1 and result["resumed_from"] >= 3, result
        log = (Path(handle.task.run_dir) / "progress.log").read_text()
        assert log.startswith("start at step 0") and "(restart 1)" in log, log
    logs = f"{signalled.job.stdout()}{signalled.job.stderr()}"
    assert "Requeued job" in logs, logs
