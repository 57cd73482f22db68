"""Execution backends: run given training tasks in local worker processes or as Slurm jobs.

Executors only run what they are given; the driver decides what needs running (it asks the store). A task is
one call ``fn(spec, run_dir) -> result`` (by default ``scaling.train.execute``), which writes its files into
``run_dir`` and resumes from ``run_dir/checkpoint.pt`` when it exists. A handle reports ``(result, None)`` or
``(None, error)``; an error's first line says what happened, the rest is the traceback or a log tail.

``LocalExecutor``: one fresh Python process per task, at most ``workers`` at a time. A process that dies
(``os._exit``, a segfault, the OOM killer) fails only its own task, with its exit code: there is no shared
pool to break.

``SlurmExecutor``: job arrays through submitit; a job that is preempted or reaches its time limit is requeued
and the task resumes from its checkpoint. Job states come from ``squeue`` and submitit's result files, never
from ``sacct`` (clusters without accounting have none). ``jobs.json`` in the submitit folder maps run_id → job
id, so a restarted driver can ``attach`` to runs still queued or running instead of submitting them again.
"""

from __future__ import annotations

import collections
import fcntl
import io
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cloudpickle
import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

TaskFn = Callable[[dict, str], dict]
Outcome = tuple[dict | None, str | None]

LOG_NAME = "worker.log"
THREAD_VARS = ("SCALING_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ExecutorError(RuntimeError):
    """A backend problem phrased for the user (e.g. Slurm not installed, sbatch refused the jobs)."""


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
    def submit(self, tasks: list[Task]) -> list[Handle]: ...

    def shutdown(self, cancel: bool) -> None: ...


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


# ------------------------------------------------------------------------------------------------------------
# Local processes

WORKER_COMMAND = "import sys, scaling.executors as e; e.worker_main(sys.argv[1], sys.argv[2])"


def worker_main(payload_path: str, out_path: str) -> None:
    """Body of a local worker process: load ``(fn, spec, run_dir)``, run it, pickle the outcome."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's; it stops workers with shutdown()
    limit_threads(int(os.environ.get("SCALING_THREADS") or available_cpus()))
    try:
        with open(payload_path, "rb") as f:
            fn, spec, run_dir = pickle.load(f)
        outcome = run_task(fn, spec, run_dir)
    except Exception as exc:  # the task could not even be loaded
        outcome = None, describe(exc)
    try:
        data = pickle.dumps(outcome)
    except Exception as exc:
        data = pickle.dumps((None, f"the task's result could not be pickled: {describe(exc)}"))
    tmp = f"{out_path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out_path)


def worker_path() -> str:
    """``PYTHONPATH`` for workers: the driver's ``sys.path`` entries that a fresh interpreter would lack (the
    project, a test directory...), not those of the Python installation, which must keep their order."""
    prefixes = {os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    extra = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if not any((path + os.sep).startswith(prefix) for prefix in prefixes) and path not in extra:
            extra.append(path)
    return os.pathsep.join(extra)


class LocalHandle:
    """A task of a ``LocalExecutor``: queued, running in its own process, or done."""

    def __init__(self, task: Task, payload: Path) -> None:
        self.task = task
        self.payload = payload
        self.process: subprocess.Popen | None = None
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
    future fails, with no record of which task killed it. A process per task attributes an exit code to
    exactly one task, costs one interpreter start-up per run (negligible next to training), and gives each run
    a clean state (threads, memory). Workers are plain ``python -c`` subprocesses rather than
    ``multiprocessing`` children: their output goes to ``run_dir/worker.log`` from the first byte (import
    errors included), and they do not re-import the driver's ``__main__``. ``fn`` travels by cloudpickle (by
    reference when importable: workers get the driver's own ``sys.path`` entries). A background thread starts
    queued tasks as slots free up.

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
                payload = self._tmp / f"{self._count}.in.pkl"
                self._count += 1
                with open(payload, "wb") as f:  # an unpicklable fn fails here, in the driver
                    cloudpickle.dump((self.fn, task.spec, task.run_dir), f)
                handle = LocalHandle(task, payload)
                self._queue.append(handle)
                handles.append(handle)
        self._wake.set()
        return handles

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
                    self._signal(handle, signal.SIGTERM)
        self._wake.set()
        self._thread.join(self.grace_s if cancel else None)
        if self._thread.is_alive():
            with self._lock:
                for handle in self._running:
                    self._signal(handle, signal.SIGKILL)
            self._thread.join()
        shutil.rmtree(self._tmp, ignore_errors=True)

    @staticmethod
    def _signal(handle: LocalHandle, sig: signal.Signals) -> None:
        """Signal the worker's whole process group (its own session): the trainer's children too."""
        assert handle.process is not None
        try:
            os.killpg(handle.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

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
                        self._signal(handle, signal.SIGKILL)
                    handle.finish(None, error)
                self._running.clear()
                self._queue.clear()
                self._closed = True

    def _launch(self) -> None:
        while self._queue and len(self._running) < self.workers:
            handle = self._queue.popleft()
            try:
                handle.process = self._start(handle)
            except Exception as exc:
                handle.finish(None, f"could not start a worker process: {describe(exc)}")
                continue
            handle.started = True
            self._running.append(handle)

    def _start(self, handle: LocalHandle) -> subprocess.Popen:
        task = handle.task
        log = Path(task.run_dir) / LOG_NAME
        log.parent.mkdir(parents=True, exist_ok=True)
        threads = int(task.spec.get("train", {}).get("threads") or self.threads)
        env = {**os.environ, **{var: str(threads) for var in THREAD_VARS}, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": worker_path()}
        with open(log, "ab") as out:
            now = time.strftime("%Y-%m-%d %H:%M:%S")
            out.write(f"=== {now} run {task.run_id}: worker with {threads} threads\n".encode())
            out.flush()
            return subprocess.Popen([sys.executable, "-c", WORKER_COMMAND, str(handle.payload),
                                     str(handle.payload.with_suffix(".out"))],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)

    def _reap(self) -> None:
        for handle in list(self._running):
            assert handle.process is not None
            code = handle.process.poll()
            if code is None:
                continue
            self._running.remove(handle)
            handle.finish(*self._collect(handle, code))

    def _collect(self, handle: LocalHandle, code: int) -> Outcome:
        out = handle.payload.with_suffix(".out")
        handle.payload.unlink(missing_ok=True)
        if out.exists():
            with open(out, "rb") as f:
                outcome: Outcome = pickle.load(f)
            out.unlink()
            return outcome
        if handle.cancelled:
            return None, "cancelled: worker stopped by shutdown"
        if code < 0:
            try:
                how = f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        return None, f"worker process died ({how}){log_tail(Path(handle.task.run_dir) / LOG_NAME)}"


# ------------------------------------------------------------------------------------------------------------
# Slurm


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


class SlurmTask(Checkpointable):
    """The callable a Slurm job runs.

    It returns ``(result, error)`` rather than raising, so that failures read the same as in local workers.
    On preemption or time-out, submitit calls ``checkpoint``, which resubmits the same call: the requeued job
    starts ``fn`` again and the trainer resumes from its own periodic ``checkpoint.pt``.
    """

    def __init__(self, fn: TaskFn) -> None:
        self.fn = fn

    def __call__(self, spec: dict, run_dir: str) -> Outcome:
        limit_threads(slurm_cpus())
        job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"run {Path(run_dir).name}: job {job}, restart {restarts}", flush=True)
        return run_task(self.fn, spec, run_dir)

    def checkpoint(self, spec: dict, run_dir: str) -> DelayedSubmission:  # type: ignore[override]
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
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
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

    @property
    def jobs_file(self) -> Path:
        return self.folder / "jobs.json"

    def submit(self, tasks: list[Task]) -> list[Handle]:
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
            self._record(new)
            handles += new
        self._handles += handles
        return list(handles)

    def attach(self, tasks: list[Task]) -> list[Handle]:
        """Handles for the tasks whose last job is still queued or running, or finished uncollected."""
        recorded = self._load()
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

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            return json.loads(self.jobs_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:  # a torn file cannot happen (atomic writes); a hand-edited one might
            return {}

    def _record(self, handles: list[SlurmHandle]) -> None:
        with self._locked():
            jobs = self._load()
            now = time.strftime("%Y-%m-%dT%H:%M:%S")
            for h in handles:
                jobs[h.task.run_id] = {"job_id": h.job_id, "run_dir": h.task.run_dir, "submitted_at": now}
            tmp = self.jobs_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(jobs, indent=1, sort_keys=True))
            os.replace(tmp, self.jobs_file)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / "jobs.json.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
