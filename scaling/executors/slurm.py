"""The ``slurm`` backend: job arrays through submitit, one array task per run.

A job that is preempted or reaches its time limit is requeued and the task resumes from its checkpoint. Job states
come from ``squeue`` and submitit's result files, never from ``sacct`` (clusters without accounting have none).
``jobs.json`` in the submitit folder maps run_id → job id, so a restarted driver can ``attach`` to runs still
queued or running instead of submitting them again. submitit is imported only when the backend is used.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import threading
import time
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

from scaling.executors.base import (
    PROJECT_ROOT,
    Backend,
    ExecutorError,
    Handle,
    Ledger,
    Option,
    Outcome,
    Task,
    TaskFn,
    available_cpus,
    execute,
    limit_threads,
    log_tail,
    run_task,
)

# squeue states in which a job may still produce its result; anything else it reports is final.
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "REQUEUED", "REQUEUE_FED",
    "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "SPECIAL_EXIT", "RESV_DEL_HOLD", "PREEMPTED",
})
GONE = "GONE"  # no longer listed by squeue (finished longer ago than the controller's MinJobAge)
MAX_ARRAY = 1000  # Slurm's default MaxArraySize is 1001: indices 0..1000


def slurm_cpus() -> int:
    """CPUs Slurm allocated to this job's task (task/none does not pin, so affinity would say all of them)."""
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return available_cpus()


class SlurmTask:
    """The callable a Slurm job runs.

    It returns ``(result, error)`` rather than raising, so that failures read the same as in local workers.
    On preemption or time-out, submitit calls ``checkpoint`` (any callable with one is checkpointable, as its
    ``Checkpointable`` base would make it), which resubmits the same call: the requeued job starts ``fn`` again
    and the trainer resumes from its own periodic ``checkpoint.pt``.
    """

    def __init__(self, fn: TaskFn) -> None:
        self.fn = fn

    def __call__(self, spec: dict, run_dir: str) -> Outcome:
        limit_threads(slurm_cpus())
        job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"run {Path(run_dir).name}: job {job}, restart {restarts}", flush=True)
        return run_task(self.fn, spec, run_dir)

    def checkpoint(self, spec: dict, run_dir: str) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, spec, run_dir)


class SlurmQueue:
    """Job states from one ``squeue`` call for all tracked jobs, refreshed at most every ``poll_s``."""

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self._tracked: set[str] = set()  # array (or plain) job ids: "123" for 123_0, 123_1, ...
        self._jobs: dict[str, tuple[str, str]] = {}  # "123_4" → (state, stdout path)
        self._checked = float("-inf")
        self._lock = threading.Lock()

    def track(self, job_ids: list[str]) -> None:
        with self._lock:
            self._tracked.update(job_id.split("_")[0] for job_id in job_ids)
            self._checked = float("-inf")  # the last listing predates these jobs

    def state(self, job_id: str) -> str | None:
        """The job's squeue state, ``GONE``, or None while squeue cannot be reached."""
        self.refresh(force=False)
        with self._lock:
            if self._checked == float("-inf"):
                return None
            return self._jobs.get(job_id, (GONE, ""))[0]

    def stdout(self, job_id: str) -> str:
        with self._lock:
            return self._jobs.get(job_id, ("", ""))[1]

    def refresh(self, force: bool) -> None:
        with self._lock:
            if not self._tracked or (not force and time.monotonic() - self._checked < self.poll_s):
                return
            ids = sorted(self._tracked)
        command = ["squeue", "--noheader", "--array", "--states=all", "--jobs", ",".join(ids),
                   "--Format=JobArrayID:|,State:|,StdOut:|"]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:  # all of them purged: an empty list
            return
        jobs = {}
        for line in proc.stdout.splitlines():
            parts = line.rstrip("|").split("|", 2)
            if len(parts) == 3:
                jobs[parts[0].strip()] = (parts[1].strip(), parts[2].strip())
        with self._lock:
            self._jobs = jobs
            self._checked = time.monotonic()


class SlurmHandle:
    """A task running as a Slurm job (an element of a job array), through submitit."""

    def __init__(self, task: Task, job: Any, queue: SlurmQueue, result_grace_s: float = 15.0) -> None:
        self.task = task
        self.job = job  # submitit.SlurmJob
        self.queue = queue
        self.result_grace_s = result_grace_s
        self._outcome: Outcome | None = None

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    def done(self) -> bool:
        if self._outcome is not None or self.job.paths.result_pickle.exists():
            return True
        state = self.queue.state(self.job_id)
        return state is not None and state not in ACTIVE_STATES

    def outcome(self) -> Outcome:
        while not self.done():
            time.sleep(min(self.queue.poll_s, 1.0))
        if self._outcome is None:
            self._outcome = self._read()
        return self._outcome

    def _read(self) -> Outcome:
        pickle_path = self.job.paths.result_pickle
        state = self.queue.state(self.job_id) or "UNKNOWN"
        if state in ("COMPLETED", GONE):  # on a shared filesystem, the result file may show up late
            deadline = time.monotonic() + self.result_grace_s
            while not pickle_path.exists() and time.monotonic() < deadline:
                time.sleep(0.5)
        if pickle_path.exists():
            try:
                value = self.job.result()
            except Exception as exc:  # the job failed outside the task (e.g. it could not unpickle it)
                return None, f"slurm job {self.job_id} failed: {exc}"
            if isinstance(value, tuple) and len(value) == 2:
                return value
            return None, f"slurm job {self.job_id} returned {type(value).__name__}, not (result, error)"
        info = job_info(self.job_id)
        state = info.get("JobState", state)
        exit_code = info.get("ExitCode", "")
        code = f", exit code {exit_code.split(':')[0]}" if exit_code else ""
        signal_part = exit_code.split(":")[1] if exit_code.count(":") == 1 else "0"
        killed = f", signal {signal_part}" if signal_part not in ("", "0") else ""
        reason = f", {info['Reason']}" if info.get("Reason", "None") != "None" else ""
        return None, (f"slurm job {self.job_id} ended without a result ({state}{code}{killed}{reason})"
                      f"{log_tail(self.job.paths.stderr)}")


def controller_problem() -> str | None:
    """Why ``sinfo`` gets no answer from the controller (its last error line), or None when it answers."""
    try:
        proc = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed ({exc})"
    if proc.returncode != 0:
        return sbatch_reason(proc.stderr or f"sinfo exited with code {proc.returncode}")
    return None


def sbatch_reason(stderr: str) -> str:
    """The telling line of sbatch's complaint (its last "error:" or "fatal:" line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    telling = [line for line in lines if "fatal:" in line or "error:" in line]
    return (telling or lines or ["no message"])[-1]


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` fields, or {} once the controller has forgotten the job."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if proc.returncode != 0:
        return {}
    return dict(field.split("=", 1) for field in proc.stdout.split() if "=" in field)


class SlurmExecutor:
    """Submits tasks as Slurm job arrays through submitit; ``folder`` (on a filesystem the nodes share) holds
    submitit's pickles and logs (``<job>_0_log.out/err``) and ``jobs.json``.

    The job runs the driver's Python (``sys.executable``) in the driver's working directory, with the project
    on ``PYTHONPATH`` and the driver's environment (sbatch's default ``--export=ALL``). Each task's threads
    follow its Slurm allocation (``cpus_per_task``, else 1 CPU).

    Restarted drivers: ``jobs.json`` maps run_id → the last job id submitted for it. ``attach(tasks)`` returns
    handles for those of ``tasks`` whose job is still queued or running (or has finished with a result nobody
    collected); the driver submits only the others. A job counts as ours only if squeue shows its output under
    this folder, so ids reused by a reset cluster are not mistaken for ours.

    ``shutdown(cancel=True)`` scancels the jobs this executor submitted or attached; ``cancel=False`` leaves
    them running, for a later driver to attach to.
    """

    def __init__(self, folder: str | os.PathLike, partition: str | None = None, time_min: int = 60,
                 cpus_per_task: int | None = None, gpus_per_node: int = 0, mem_gb: float | None = None,
                 max_parallel: int | None = None, fn: TaskFn = execute, poll_s: float = 10.0,
                 name: str = "scaling") -> None:
        missing = [cmd for cmd in ("sbatch", "squeue", "scancel", "sinfo") if shutil.which(cmd) is None]
        if missing:
            raise ExecutorError(f"the slurm executor needs Slurm's {', '.join(missing)} on PATH (is this a Slurm "
                                "login node? scripts/local-slurm.sh sets up a single-node cluster)")
        problem = controller_problem()
        if problem:
            raise ExecutorError(f"the slurm executor cannot reach a Slurm controller: {problem}")
        import submitit

        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.folder / "jobs.json")
        self.fn = fn
        self.queue = SlurmQueue(poll_s)
        self._handles: list[SlurmHandle] = []
        self._closed = False
        python_path = f"export PYTHONPATH={shlex.quote(str(PROJECT_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": time_min,
            # submitit's SIGUSR2 (checkpoint and requeue) this long before the time limit
            "slurm_signal_delay_s": max(10, min(90, time_min * 15)),
            "slurm_setup": [f"cd {shlex.quote(os.getcwd())}", python_path],
            "slurm_partition": partition,
            "cpus_per_task": cpus_per_task,
            "gpus_per_node": gpus_per_node or None,
            "mem_gb": mem_gb,
            "slurm_array_parallelism": max_parallel,
        }
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster="slurm")
        self.executor.update_parameters(**{k: v for k, v in params.items() if v is not None})

    def submit(self, tasks: list[Task]) -> list[Handle]:
        import submitit

        if self._closed:
            raise RuntimeError("this executor is shut down")
        handles: list[SlurmHandle] = []
        for start in range(0, len(tasks), MAX_ARRAY):  # max_parallel holds within each array
            chunk = tasks[start:start + MAX_ARRAY]
            specs, run_dirs = [t.spec for t in chunk], [t.run_dir for t in chunk]
            try:
                with redirect_stderr(io.StringIO()):  # submitit echoes a refusing sbatch's stderr; exc has it
                    jobs = self.executor.map_array(SlurmTask(self.fn), specs, run_dirs)
            except submitit.core.utils.FailedJobError as exc:
                raise ExecutorError(f"sbatch refused {len(chunk)} jobs: {sbatch_reason(str(exc))} "
                                    "(does `sinfo` list a partition?)") from None
            new = [SlurmHandle(task, job, self.queue) for task, job in zip(chunk, jobs, strict=True)]
            self.queue.track([h.job_id for h in new])
            self.ledger.record({h.task.run_id: {"job_id": h.job_id, "run_dir": h.task.run_dir} for h in new})
            handles += new
        self._handles += handles
        return list(handles)

    def attach(self, tasks: list[Task]) -> list[Handle]:
        """Handles for the tasks whose last job is still queued or running, or finished uncollected."""
        import submitit

        recorded = self.ledger.load()
        candidates = [(task, recorded[task.run_id]["job_id"]) for task in tasks
                      if task.run_id in recorded and recorded[task.run_id].get("run_dir") == task.run_dir]
        if not candidates:
            return []
        self.queue.track([job_id for _, job_id in candidates])
        self.queue.refresh(force=True)
        handles: list[SlurmHandle] = []
        for task, job_id in candidates:
            handle = SlurmHandle(task, submitit.SlurmJob(folder=self.folder, job_id=job_id), self.queue)
            state = self.queue.state(job_id)
            if state is None:
                raise ExecutorError("squeue failed: cannot tell which runs are still queued or running")
            ours = self.queue.stdout(job_id).startswith(str(self.folder))
            if handle.job.paths.result_pickle.exists() or (state in ACTIVE_STATES and ours):
                handles.append(handle)
        self._handles += handles
        return list(handles)

    def shutdown(self, cancel: bool) -> None:
        self._closed = True
        if not cancel:
            return
        running = [h.job_id for h in self._handles if not h.done()]
        for start in range(0, len(running), 500):
            subprocess.run(["scancel", *running[start:start + 500]], capture_output=True, timeout=120)


def make(runs_dir: Path, fn: TaskFn, options: dict[str, Any]) -> SlurmExecutor:
    return SlurmExecutor(folder=runs_dir / "_slurm", fn=fn, **options)


BACKEND = Backend(
    name="slurm",
    summary="Slurm job arrays through submitit (from a login node; the runs directory on a shared filesystem)",
    options=(
        Option("partition", str, "partition"),
        Option("time_min", int, "time limit per run (minutes), 60 if not given"),
        Option("cpus_per_task", int, "CPUs per run"),
        Option("gpus_per_node", int, "GPUs per run", minimum=0),
        Option("mem_gb", float, "memory per run (GB)", minimum=0, positive=True),
        Option("max_parallel", int, "array jobs running at once"),
    ),
    make=make,
)
