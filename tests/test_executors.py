"""LocalExecutor: parallel workers, errors, process deaths attributed to their own run, cancellation."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from scaling.executors import LocalExecutor, Task, available_cpus


def work(spec: dict, run_dir: str) -> dict:
    """A stand-in for ``scaling.train.execute``: behaves as ``spec["action"]`` says."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    started = time.time()
    (path / "started.tmp").write_text(str(os.getpid()))
    os.replace(path / "started.tmp", path / "started")  # the test reads the pid as soon as the file exists
    print(f"working on {spec['name']}")
    action = spec.get("action", "ok")
    if action == "raise":
        raise ValueError(f"bad spec {spec['name']}")
    if action == "exit":
        os._exit(3)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(spec.get("sleep", 0))
    result = {"run_id": spec["name"], "status": "ok", "pid": os.getpid(), "started": started,
              "finished": time.time(), "threads": os.environ.get("SCALING_THREADS")}
    (path / "result.json").write_text(json.dumps(result))
    return result


def tasks(tmp_path: Path, *specs: dict) -> list[Task]:
    return [Task(run_id=s["name"], spec=s, run_dir=str(tmp_path / s["name"])) for s in specs]


def wait_all(handles, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(h.done() for h in handles):
        assert time.monotonic() < deadline, "tasks did not finish in time"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_runs_tasks_with_two_workers(tmp_path):
    executor = LocalExecutor(workers=2, fn=work)
    handles = executor.submit(tasks(tmp_path, *[{"name": f"r{i}", "sleep": 0.5} for i in range(4)]))
    wait_all(handles)
    results = [h.outcome() for h in handles]
    executor.shutdown(cancel=False)

    assert [error for _, error in results] == [None] * 4
    assert [r["run_id"] for r, _ in results] == ["r0", "r1", "r2", "r3"]
    assert len({r["pid"] for r, _ in results}) == 4  # a fresh process per task
    assert {r["threads"] for r, _ in results} == {str(max(1, available_cpus() // 2))}
    # never more than two at once, and the two workers did overlap
    spans = [(r["started"], r["finished"]) for r, _ in results]
    overlaps = [sum(s <= t < f for s, f in spans) for t, _ in spans]
    assert max(overlaps) <= 2 and max(overlaps) == 2
    log = (tmp_path / "r0" / "worker.log").read_text()
    assert "run r0: worker with" in log and "working on r0" in log


def probe(spec: dict, run_dir: str) -> dict:
    """What a forked worker starts with, and a change to the template's modules that must not reach the next."""
    preloaded = "torch._dynamo" in sys.modules  # before this task imports anything
    import torch

    import scaling.train

    seen = getattr(scaling.train, "probe_mark", None)
    scaling.train.probe_mark = spec["name"]
    print(f"probe {spec['name']}")
    return {"preloaded": preloaded, "seen": seen, "own_session": os.getsid(0) == os.getpid(),
            "torch_threads": torch.get_num_threads(), "env": os.environ.get("SCALING_PROBE")}


def test_workers_fork_from_a_preloaded_template_with_their_own_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_PROBE", "from the driver")
    executor = LocalExecutor(workers=1, fn=probe)
    handles = executor.submit(tasks(tmp_path, {"name": "a", "train": {"threads": 1}},
                                    {"name": "b", "train": {"threads": 2}}))
    wait_all(handles)
    (a, _), (b, _) = (h.outcome() for h in handles)
    executor.shutdown(cancel=False)
    assert a["preloaded"] and b["preloaded"]  # the trainer's imports were paid once, by the template
    assert a["seen"] is None and b["seen"] is None  # each task starts from the template, not from the last task
    assert a["own_session"] and b["own_session"]
    assert (a["torch_threads"], b["torch_threads"]) == (1, 2)
    assert a["env"] == b["env"] == "from the driver"
    assert "probe b" in (tmp_path / "b" / "worker.log").read_text()


def test_exception_is_recorded_with_its_message(tmp_path):
    executor = LocalExecutor(workers=1, fn=work)
    [handle] = executor.submit(tasks(tmp_path, {"name": "bad", "action": "raise"}))
    result, error = handle.outcome()
    executor.shutdown(cancel=False)
    assert result is None
    assert error.splitlines()[0] == "ValueError: bad spec bad"
    assert "Traceback" in error and "raise ValueError" in error


def test_process_death_fails_only_its_own_task(tmp_path):
    executor = LocalExecutor(workers=2, fn=work)
    specs = [{"name": "a", "sleep": 0.3}, {"name": "dies", "action": "exit"}, {"name": "b", "sleep": 0.3},
             {"name": "killed", "action": "kill"}, {"name": "c"}]
    handles = executor.submit(tasks(tmp_path, *specs))
    wait_all(handles)
    outcomes = {h.task.run_id: h.outcome() for h in handles}
    executor.shutdown(cancel=False)

    for name in ("a", "b", "c"):
        assert outcomes[name][1] is None and outcomes[name][0]["run_id"] == name
    result, error = outcomes["dies"]
    assert result is None and error.startswith("worker process died (exit code 3)")
    assert "working on dies" in error  # the tail of its worker.log
    assert outcomes["killed"][1].startswith("worker process died (killed by signal SIGKILL)")


def test_shutdown_cancel_stops_workers(tmp_path):
    executor = LocalExecutor(workers=2, fn=work, grace_s=5)
    handles = executor.submit(tasks(tmp_path, *[{"name": f"s{i}", "sleep": 60} for i in range(3)]))
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"s{i}" / "started").exists() for i in range(2)):
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.05)
    pids = [int((tmp_path / f"s{i}" / "started").read_text()) for i in range(2)]

    started = time.monotonic()
    executor.shutdown(cancel=True)
    assert time.monotonic() - started < 5
    assert all(h.done() for h in handles)
    errors = [h.outcome()[1] for h in handles]
    assert errors[:2] == ["cancelled: worker stopped by shutdown"] * 2
    assert errors[2] == "cancelled before it started"
    assert not (tmp_path / "s2").exists()
    assert not any(alive(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="shut down"):
        executor.submit(tasks(tmp_path, {"name": "late"}))


def test_shutdown_without_cancel_waits_for_queued_tasks(tmp_path):
    executor = LocalExecutor(workers=1, fn=work)
    handles = executor.submit(tasks(tmp_path, {"name": "x", "sleep": 0.2}, {"name": "y"}))
    executor.shutdown(cancel=False)
    assert [h.outcome()[1] for h in handles] == [None, None]


def test_closures_run_and_unpicklable_functions_fail_at_submit(tmp_path):
    offset = 40
    executor = LocalExecutor(workers=1, fn=lambda spec, run_dir: {"answer": spec["n"] + offset})
    [handle] = executor.submit(tasks(tmp_path, {"name": "closure", "n": 2}))
    assert handle.outcome() == ({"answer": 42}, None)
    executor.shutdown(cancel=False)

    lock = threading.Lock()
    executor = LocalExecutor(workers=1, fn=lambda spec, run_dir: {"locked": lock.locked()})
    with pytest.raises(TypeError, match="pickle"):
        executor.submit(tasks(tmp_path, {"name": "unpicklable"}))
    executor.shutdown(cancel=True)



def test_a_worker_whose_parent_dies_stops_itself(tmp_path):
    """A worker started with ``SCALING_WORKER_PARENT`` (as the Ray backend starts one under each run's actor) gets
    SIGTERM once that parent is gone: no run trains on unseen while a restarted actor starts it again."""
    import subprocess
    import sys

    code = """if True:
        import os, sys
        from pathlib import Path
        from scaling.executors import Task
        from scaling.executors.process import PARENT_VAR, pickle_task, start_worker

        task = Task("orphan", {}, sys.argv[1])
        payload = Path(sys.argv[1]) / "task.pkl"
        payload.parent.mkdir(parents=True)
        payload.write_bytes(pickle_task(lambda spec, run_dir: __import__("time").sleep(60), task))
        worker = start_worker(payload, task, 1, env={**os.environ, PARENT_VAR: str(os.getpid())})
        print(worker.pid, flush=True)
        os._exit(0)  # the parent dies; the worker lives on in its own session until it notices
    """
    parent = subprocess.run([sys.executable, "-c", code, str(tmp_path / "orphan")], capture_output=True, text=True,
                            timeout=60)
    assert parent.returncode == 0, parent.stderr
    worker = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 30
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the orphaned worker did not stop")
