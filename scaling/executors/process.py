"""One task in a fresh Python process of its own: how it is started, what it runs, how its end is read.

The Ray backend runs a plain ``python -c`` subprocess under each run's actor (``start_worker``): its output goes
to ``run_dir/worker.log`` from the first byte (import errors included) and it does not re-import the driver's
``__main__``. The local backend forks each task from a template process that has imported the trainer once
(``fork_worker``, multiprocessing's forkserver): a fresh interpreter spends ~3 s importing torch and the compiler
stack that ``torch.optim`` loads on first use, a fork of the template ~0.05 s, and a small run trains in seconds.
Either way the process is a session of its own, so signals to its process group reach the trainer's children
too, and an exit code or signal is attributed to exactly one task. The task ``(fn, spec, run_dir)`` arrives as a
cloudpickle file; the outcome leaves as a pickle file written atomically.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.context
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from scaling.executors.base import (
    LOG_NAME,
    THREAD_VARS,
    Outcome,
    Task,
    TaskFn,
    available_cpus,
    describe,
    limit_threads,
    log_tail,
    run_task,
)

WORKER_COMMAND = "import sys, scaling.executors.process as p; p.worker_main(sys.argv[1], sys.argv[2])"
PARENT_VAR = "SCALING_WORKER_PARENT"  # set to the starting process's pid: the worker stops when that process dies
PRELOAD = ("scaling.train", "torch._dynamo")  # what the template imports once: the trainer, and what torch.optim
# imports lazily on its first call (1.4 s of each run's start-up otherwise)


def worker_main(payload_path: str, out_path: str) -> None:
    """Body of a worker process: load ``(fn, spec, run_dir)``, run it, pickle the outcome."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's; it stops workers with shutdown()
    parent = os.environ.pop(PARENT_VAR, "")
    if parent:
        stop_when_orphaned(int(parent))
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


def stop_when_orphaned(parent: int, poll_s: float = 1.0) -> None:
    """SIGTERM this process (the trainer checkpoints where it is, then exits) once ``parent`` is no longer its
    parent: a worker whose supervisor died (a Ray actor) must not train on unseen while a restarted one starts the
    run again."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="scaling-parent-watch", daemon=True).start()


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


def pickle_task(fn: TaskFn, task: Task) -> bytes:
    """The task for a worker process, pickled (an unpicklable ``fn`` fails here, in the caller)."""
    import cloudpickle  # only a driver that starts workers pays for it

    return cloudpickle.dumps((fn, task.spec, task.run_dir))


def start_worker(payload: Path, task: Task, threads: int, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> subprocess.Popen:
    """Start the worker process for the file ``payload`` (``pickle_task``'s bytes) with ``threads`` CPU threads;
    its outcome goes to ``outcome_path(payload)``. ``env``: the environment (default this process's)."""
    log = Path(task.run_dir) / LOG_NAME
    write_header(log, task, threads)
    env = {**(os.environ if env is None else env), **{var: str(threads) for var in THREAD_VARS},
           "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", WORKER_COMMAND, str(payload), str(outcome_path(payload))],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


@functools.cache
def template() -> multiprocessing.context.ForkServerContext:
    """The context whose processes fork from the template (started on first use, ended with this process)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context


class ForkedWorker:
    """A worker forked from the template: the ``pid`` and ``poll()`` of ``subprocess.Popen`` that the local
    backend uses. Its exit code comes through the template; should the template itself be killed, its workers read
    as exit code 255 although they may still run (the run directory's lock keeps a retry from training beside one).
    """

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process
        self.pid = process.pid

    def poll(self) -> int | None:
        """The exit code (negative: the signal that killed it), or None while it runs."""
        return self.process.exitcode


def fork_worker(payload: Path, task: Task, threads: int, env: dict[str, str] | None = None) -> ForkedWorker:
    """``start_worker``'s process, forked from the template: the same log, environment, threads and session.
    It starts in the driver's working directory with the driver's ``sys.path``."""
    log = Path(task.run_dir) / LOG_NAME
    write_header(log, task, threads)
    env = {**(os.environ if env is None else env), **{var: str(threads) for var in THREAD_VARS}}
    process = template().Process(target=forked_main, args=(str(payload), str(outcome_path(payload)), str(log), env),
                                 name=f"scaling-{task.run_id}")
    process.start()
    return ForkedWorker(process)


def forked_main(payload_path: str, out_path: str, log_path: str, env: dict[str, str]) -> None:
    """Body of a forked worker: its own session, output to the run's log, the given environment, then
    ``worker_main``."""
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None when the driver started without them
            stream.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    worker_main(payload_path, out_path)


def write_header(log: Path, task: Task, threads: int) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"=== {now} run {task.run_id}: worker with {threads} threads\n".encode())


def outcome_path(payload: Path) -> Path:
    return payload.with_suffix(".out")


def signal_worker(process: subprocess.Popen | ForkedWorker, sig: signal.Signals) -> None:
    """Signal the worker's whole process group (its own session): the trainer's children too; the worker alone
    if it has not made its session yet (a forked one does that first thing)."""
    for kill in (os.killpg, os.kill):
        try:
            kill(process.pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            pass


def collect(payload: Path, task: Task, code: int, cancelled: bool) -> Outcome:
    """The outcome of the worker that ran ``payload`` and exited with ``code`` (removing its files): what it
    wrote, or why it wrote nothing (stopped by the driver, killed by a signal, an exit code, its log's tail)."""
    out = outcome_path(payload)
    payload.unlink(missing_ok=True)
    if out.exists():
        with open(out, "rb") as f:
            outcome: Outcome = pickle.load(f)
        out.unlink()
        return outcome
    if cancelled:
        return None, "cancelled: worker stopped by shutdown"
    if code < 0:
        try:
            how = f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit code {code}"
    return None, f"worker process died ({how}){log_tail(Path(task.run_dir) / LOG_NAME)}"
