"""The ``ray`` backend: each run is a detached Ray actor on a running cluster, which trains it in a worker process.

Why a detached actor per run: a plain Ray task belongs to the driver that submitted it and dies with it, and Ray
Jobs need the dashboard's job server. A named actor with ``lifetime="detached"`` outlives the driver. Its
constructor starts the run's worker process (``scaling.executors.process``, as the local backend does:
``worker.log``, exit codes, SIGTERM to stop) and ``wait`` returns the outcome. ``actors.json`` in the runs
directory's ``_ray`` folder maps run_id → actor name (written before the actor is created), so a restarted driver
``attach``es to the actors of runs still in flight, or finished and not yet collected, instead of submitting them
again, as the Slurm backend does with job ids. The driver kills an actor once it has its outcome. If an actor dies
(its node was lost), Ray restarts it up to ``MAX_RESTARTS`` times and the run resumes from its checkpoint, as a
requeued Slurm job does; one that dies for good fails its run, which the driver retries (``--retries``).

Resources per run: ``cpus_per_task`` CPUs (default the run's ``train.threads``), ``mem_gb``, ``gpus_per_task``;
Ray starts an actor once a node has them free. The worker process runs in the driver's working directory when the
node has it, with the driver's ``SCALING_*`` variables. So every node needs scaling installed in the Python that
runs Ray, and the runs directory (and the data cache) on a filesystem all nodes share. Workers write run files
only; the driver alone writes the store. ``ray`` (the extra ``scaling[ray]``) is imported only when this backend
is used.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from scaling.executors.base import Backend, ExecutorError, Handle, Ledger, Option, Outcome, Task, TaskFn, execute
from scaling.executors.process import PARENT_VAR, collect, pickle_task, signal_worker, start_worker, worker_path

NAMESPACE = "scaling"
MAX_RESTARTS = 3  # of a run's actor after its node died; each restart resumes the run from its checkpoint
WAIT_S = 10.0  # how long one ``wait`` call blocks in the actor (a call of a killed driver ends within this)


class RunActor:
    """A run's actor. Its constructor starts the worker process and a thread that, once the worker has ended,
    writes the outcome to ``outcome_file`` (in the shared ``_ray`` folder; written once, atomically), so that a
    driver can read it even after this actor is gone. A restarted actor whose run already has an outcome starts
    nothing, and neither does one that the driver cancelled before Ray could start it (``cancel_file``).
    ``wait`` returns the outcome when there is one; ``stop`` ends the worker. If the actor dies, so does its worker
    (it stops itself, ``process.stop_when_orphaned``)."""

    def __init__(self, task_pickle: bytes, task: Task, threads: int, env: dict[str, str], cwd: str,
                 outcome_file: str) -> None:
        self.task = task
        self.outcome_file = Path(outcome_file)
        self.cancelled = False
        self.ended = threading.Event()  # calls run in threads of their own (a threaded actor)
        if self.outcome_file.exists() or cancel_file(self.outcome_file).exists():
            self.ended.set()
            return
        self.tmp = Path(tempfile.mkdtemp(prefix="scaling-ray-"))
        self.payload = self.tmp / "task.in.pkl"
        self.payload.write_bytes(task_pickle)
        env = {**os.environ, **env, PARENT_VAR: str(os.getpid())}  # the worker stops if this actor dies
        self.process = start_worker(self.payload, task, threads, env=env, cwd=cwd if os.path.isdir(cwd) else None)
        threading.Thread(target=self._watch, name="scaling-run-watch", daemon=True).start()

    def _watch(self) -> None:
        code = self.process.wait()
        outcome = collect(self.payload, self.task, code, self.cancelled)
        shutil.rmtree(self.tmp, ignore_errors=True)
        write_outcome(self.outcome_file, outcome)
        self.ended.set()

    def wait(self, timeout_s: float) -> Outcome | None:
        """The outcome, or None if the worker is still running after ``timeout_s``."""
        return read_outcome(self.outcome_file) if self.ended.wait(timeout_s) else None

    def stop(self, grace_s: float) -> Outcome | None:
        """SIGTERM to the worker (the trainer checkpoints where it is), SIGKILL after ``grace_s``; its outcome."""
        if not self.ended.is_set():
            self.cancelled = True
            signal_worker(self.process, signal.SIGTERM)
            if not self.ended.wait(grace_s):
                signal_worker(self.process, signal.SIGKILL)
                self.ended.wait(grace_s)
        return read_outcome(self.outcome_file)


def cancel_file(outcome_file: Path) -> Path:
    return outcome_file.with_suffix(".cancel")


def write_outcome(path: Path, outcome: Outcome) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(outcome))
    os.replace(tmp, path)


def read_outcome(path: Path) -> Outcome | None:
    try:
        return pickle.loads(path.read_bytes())
    except FileNotFoundError:
        return None


class RayHandle:
    """A run in its actor. ``done`` looks at one outstanding ``wait`` call (a local check, no round trip) and, if
    the actor has died, at the outcome file it may have written first."""

    def __init__(self, task: Task, actor: Any, name: str, outcome_file: Path) -> None:
        self.task = task
        self.actor = actor
        self.name = name
        self.outcome_file = outcome_file
        self._call: Any = None
        self._outcome: Outcome | None = None

    def done(self) -> bool:
        import ray

        if self._outcome is not None:
            return True
        if self._call is None:
            self._call = self.actor.wait.remote(WAIT_S)
        ready, _ = ray.wait([self._call], timeout=0)
        if not ready:
            return False
        call, self._call = self._call, None
        try:
            outcome = ray.get(call)
        except ray.exceptions.RayError as exc:  # the actor died for good (restarts used up), or was killed
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            outcome = read_outcome(self.outcome_file) or (None, f"ray actor {self.name} of this run died: {first}")
        if outcome is None:
            return False
        self.finish(outcome)
        return True

    def outcome(self) -> Outcome:
        while not self.done():
            time.sleep(0.2)
        assert self._outcome is not None
        return self._outcome

    def finish(self, outcome: Outcome) -> None:
        """Keep the outcome, end the actor and remove its outcome file: nothing else needs them."""
        self._outcome = outcome
        kill(self.name)
        self.outcome_file.unlink(missing_ok=True)


def kill(name: str) -> None:
    """End the actor called ``name`` if it is alive (never restarted)."""
    import ray

    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    except ValueError:  # gone already
        pass


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """An ExecutorError at once if nothing listens at ``HOST:PORT`` (``ray.init`` would retry for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():  # "auto", or a form Ray resolves itself
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ExecutorError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                            "`ray start --head` or give its head's HOST:PORT") from None


class RayExecutor:
    """Runs each task in a detached actor of the Ray cluster at ``address`` (else ``$RAY_ADDRESS``); ``folder``
    holds ``actors.json`` and the outcome files of runs not yet collected (``<actor>.outcome``).

    A driver collecting an outcome kills its actor and removes the file. Actors that finished while no driver
    was there (their runs may be ingested from their run files and never attached) are killed when an executor
    starts or shuts down.
    ``shutdown(cancel=True)`` stops the workers (SIGTERM: the trainer checkpoints where it is; SIGKILL after
    ``grace_s``) and kills their actors; ``cancel=False`` leaves running ones running, for a later driver to attach
    to."""

    def __init__(self, folder: str | os.PathLike, address: str | None = None, cpus_per_task: int | None = None,
                 gpus_per_task: float | None = None, mem_gb: float | None = None, fn: TaskFn = execute,
                 grace_s: float = 10.0) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorError("the ray executor needs Ray: pip install 'scaling[ray]'") from None
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise ExecutorError("the ray executor needs a cluster: --address HOST:PORT (or RAY_ADDRESS) of a "
                                "running Ray head (`ray start --head` starts one)")
        if not ray.is_initialized():
            check_reachable(address)
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ExecutorError(f"cannot connect to a Ray cluster at {address}: {first}") from None
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.folder / "actors.json")
        self.fn = fn
        self.cpus_per_task = cpus_per_task
        self.gpus_per_task = gpus_per_task
        self.mem_gb = mem_gb
        self.grace_s = grace_s
        self.actor_class = ray.remote(RunActor)
        # what the worker process needs from the driver: its working directory (data/cache), SCALING_* settings,
        # and the sys.path entries a fresh interpreter would lack
        self.cwd = os.getcwd()
        self.env = {**{k: v for k, v in os.environ.items() if k.startswith("SCALING_")}, "PYTHONPATH": worker_path()}
        self._handles: list[RayHandle] = []
        self._closed = False
        self._reap()

    def submit(self, tasks: list[Task]) -> list[Handle]:
        if self._closed:
            raise RuntimeError("this executor is shut down")
        pickles = [pickle_task(self.fn, task) for task in tasks]  # an unpicklable fn fails before anything starts
        names = [f"{task.run_id}-{uuid.uuid4().hex[:12]}" for task in tasks]
        previous = self.ledger.load()
        # before the actors exist: a killed driver's successor can find every one
        self.ledger.record({task.run_id: {"actor": name, "run_dir": task.run_dir}
                            for task, name in zip(tasks, names, strict=True)})
        handles: list[RayHandle] = []
        for task, name, task_pickle in zip(tasks, names, pickles, strict=True):
            if task.run_id in previous:  # a run has one actor at most
                kill(previous[task.run_id]["actor"])
            threads = int(task.spec.get("train", {}).get("threads") or self.cpus_per_task or 1)
            resources: dict[str, Any] = {"num_cpus": self.cpus_per_task or threads}
            if self.gpus_per_task:
                resources["num_gpus"] = self.gpus_per_task
            if self.mem_gb:
                resources["memory"] = int(self.mem_gb * 2**30)
            actor = self.actor_class.options(
                name=name, namespace=NAMESPACE, lifetime="detached", max_restarts=MAX_RESTARTS,
                max_task_retries=MAX_RESTARTS, max_concurrency=4, **resources,
            ).remote(task_pickle, task, threads, self.env, self.cwd, str(self.outcome_file(name)))
            handles.append(RayHandle(task, actor, name, self.outcome_file(name)))
        self._handles += handles
        return list(handles)

    def attach(self, tasks: list[Task]) -> list[Handle]:
        """Handles for the tasks whose recorded actor is still alive, or has left an outcome nobody collected."""
        import ray

        recorded = self.ledger.load()
        handles: list[RayHandle] = []
        for task in tasks:
            entry = recorded.get(task.run_id, {})
            if entry.get("run_dir") != task.run_dir:
                continue
            name = entry["actor"]
            outcome = read_outcome(self.outcome_file(name))
            try:
                actor = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:  # gone: collected and killed, or the cluster was restarted
                actor = None
            if outcome is None and actor is None:
                continue
            handle = RayHandle(task, actor, name, self.outcome_file(name))
            if outcome is not None:
                handle.finish(outcome)
            handles.append(handle)
        self._handles += handles
        return list(handles)

    def shutdown(self, cancel: bool) -> None:
        import ray

        self._closed = True
        if not cancel:
            self._reap()
            return
        running = [h for h in self._handles if h._outcome is None]
        for handle in running:  # an actor Ray has not started yet will start no worker
            cancel_file(handle.outcome_file).touch()
        # stop the workers before their actors are killed: Ray kills a dead actor's children at once (no checkpoint)
        calls = [h.actor.stop.remote(self.grace_s) for h in running]
        if calls:
            ray.wait(calls, num_returns=len(calls), timeout=self.grace_s + 5)
        for handle in running:
            handle.finish(read_outcome(handle.outcome_file) or (None, "cancelled: stopped by shutdown"))
            cancel_file(handle.outcome_file).unlink(missing_ok=True)

    def outcome_file(self, name: str) -> Path:
        return self.folder / f"{name}.outcome"

    def _reap(self) -> None:
        """Kill the recorded actors that have finished (written their outcome): nothing runs in them any more."""
        for entry in self.ledger.load().values():
            if self.outcome_file(entry["actor"]).exists():
                kill(entry["actor"])


def make(runs_dir: Path, fn: TaskFn, options: dict[str, Any]) -> RayExecutor:
    return RayExecutor(folder=runs_dir / "_ray", fn=fn, **options)


BACKEND = Backend(
    name="ray",
    summary="detached actors on a running Ray cluster (the runs directory on a shared filesystem)",
    options=(
        Option("address", str, "cluster address, HOST:PORT of its head (or auto); $RAY_ADDRESS if not given"),
        Option("cpus_per_task", int, "CPUs reserved per run, its train.threads if not given"),
        Option("gpus_per_task", float, "GPUs reserved per run (fractions allowed)", minimum=0),
        Option("mem_gb", float, "memory reserved per run (GB)", minimum=0, positive=True),
    ),
    make=make,
)
