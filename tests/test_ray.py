"""The ray executor against a real Ray cluster: a head on localhost with 2 CPUs, started here (``ray start --head``)
and stopped after. Real sweeps through ``scaling run``: one to the end, one whose driver is SIGKILLed and rerun.

Skipped when Ray is not installed (the extra ``scaling[ray]``; ``make install`` installs it).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_reliability import RESUMED, SMOKE, STARTED, Driver, assert_all_ok, log, runs_table, smoke_runs, wait_until

from scaling.store import connect

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shakespeare")]

RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(shakespeare):
    """``HOST:PORT`` of a fresh single-node cluster. ``ray start --block`` runs in a process group of its own, which
    holds every process of the cluster: stopping it is signalling that group (never ``ray stop``, which would stop
    every Ray instance of this user)."""
    if not RAY.exists():
        pytest.skip("Ray is not installed: pip install -e '.[ray]'")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    out = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until(lambda: "Ray runtime started" in (Path(temp) / "head.log").read_text() or head.poll() is not None,
                   "the Ray head to start", timeout=120, poll=0.2)
        if head.poll() is not None:
            pytest.fail(f"ray start failed:\n{(Path(temp) / 'head.log').read_text()[-3000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        stop_group(head)
        out.close()
        shutil.rmtree(temp, ignore_errors=True)


def stop_group(leader: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the leader's process group (``ray start --block`` then stops the cluster's processes), SIGKILL
    to what is left of it once the leader has exited or after ``grace_s``."""
    os.killpg(leader.pid, signal.SIGTERM)
    try:
        leader.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(leader.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    leader.wait()


def read_actors(runs: Path) -> dict[str, str]:
    """run_id → actor name, from the executor's actors.json."""
    try:
        return {run_id: entry["actor"] for run_id, entry in json.loads((runs / "_ray" / "actors.json").read_text()
                                                                         ).items()}
    except (OSError, ValueError):
        return {}


def live_actors(address: str, names: list[str]) -> list[str]:
    """Those of ``names`` that are actors alive on the cluster (asked from a process of its own: a driver)."""
    code = ("import json, sys, ray; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR')\n"
            "def alive(name):\n"
            "    try:\n"
            "        ray.get_actor(name, namespace='scaling')\n"
            "    except ValueError:\n"
            "        return False\n"
            "    return True\n"
            "print(json.dumps([n for n in json.loads(sys.argv[2]) if alive(n)]))")
    proc = subprocess.run([sys.executable, "-c", code, address, json.dumps(names)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sweep_runs_through_ray_and_is_ingested(ray_head, tmp_path):
    """The two shortest smoke runs through ``scaling run --executor ray`` with per-run resources from the sweep
    file's [executor] table (``--address`` from RAY_ADDRESS): both trained by Ray workers, ingested by the driver,
    and their actors gone once collected."""
    shortest = [run_id for run_id, _ in smoke_runs()[-2:]]
    sweep = tmp_path / "smoke.toml"
    sweep.write_text(SMOKE.read_text().replace("budgets = [1e10, 3e10]", "budgets = [1e10]")
                     + '\n[executor]\nbackend = "ray"\ncpus_per_task = 1\nmem_gb = 0.5\n')
    db, runs = tmp_path / "results.duckdb", tmp_path / "runs"
    proc = subprocess.run([Path(sys.executable).with_name("scaling"), "run", sweep, "--db", db, "--runs-dir", runs],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": ray_head})
    assert proc.returncode == 0, proc.stderr
    assert "2 ok; 0 already done" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    con = connect(db, read_only=True)
    try:
        stored = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
        metrics = con.execute("SELECT count(DISTINCT run_id) FROM metrics").fetchall()[0][0]
    finally:
        con.close()
    assert sorted(stored) == sorted(shortest) and set(stored.values()) == {"ok"} and metrics == 2
    actors = read_actors(runs)
    assert sorted(actors) == sorted(shortest)
    for run_id in shortest:
        assert re.search(rf"run {run_id}: worker with 1 threads", (runs / run_id / "worker.log").read_text())
        assert len(STARTED.findall(log(runs, run_id))) == 1
    assert live_actors(ray_head, list(actors.values())) == []


def worker_of(run_dir: Path) -> int | None:
    """The pid of the worker process training ``run_dir`` (its stdout is the run's worker.log), if one is."""
    log_path = str(run_dir / "worker.log")
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "fd" / "1") == log_path:
                return int(proc.name)
        except OSError:
            continue
    return None


def kill_an_actor_mid_run(runs: Path) -> str:
    """SIGKILL the actor of a run that has a checkpoint and 30+ steps to go, as if its node had died; returns the
    run. Ray restarts the actor, which starts the run again (it resumes from its checkpoint)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for run_dir in sorted(p for p in runs.iterdir() if (p / "checkpoint.pt").exists()):
            try:
                progress = json.loads((run_dir / "progress.json").read_text())
            except (OSError, ValueError):
                continue
            worker = worker_of(run_dir)
            if worker is None or progress["step"] > progress["steps"] - 30:
                continue
            stat = Path(f"/proc/{worker}/stat").read_text()
            actor = int(stat.rsplit(")", 1)[1].split()[1])  # the worker's parent
            os.kill(actor, signal.SIGKILL)
            return run_dir.name
        time.sleep(0.05)
    pytest.fail("could not catch a run between its first checkpoint and its end")


def test_killed_driver_and_actor_rerun_attaches_and_trains_every_run_once(ray_head, tmp_path):
    """The smoke sweep (6 runs, 2 at a time on the 2-CPU head): the driver is SIGKILLed once it has ingested its
    first run; the actors of the others live on. Then one actor is SIGKILLed mid-run (a lost node): Ray restarts
    it and its run resumes from a checkpoint. The rerun attaches to every actor (no run is submitted again),
    collects them as they finish, and every run is stored ``ok``, trained once (the victim: once, then resumed)."""
    db, runs = tmp_path / "results.duckdb", tmp_path / "runs"
    args = ("--executor", "ray", "--address", ray_head, "--db", str(db), "--runs-dir", str(runs))
    first = Driver(tmp_path, "ray-first", *args)
    try:
        wait_until(lambda: re.search(r"^\[1/6\] \w+ ok$", first.stderr(), re.M), "the first run's ingest", first,
                   timeout=300)
        first.signal(signal.SIGKILL)
        first.proc.wait()
    finally:
        first.stop()
    submitted = read_actors(runs)
    assert len(submitted) == 6
    in_flight = live_actors(ray_head, list(submitted.values()))
    assert 1 <= len(in_flight) <= 5, in_flight  # the collected run's actor is gone, the others live on
    victim = kill_an_actor_mid_run(runs)
    second = Driver(tmp_path, "ray-second", *args)
    try:
        assert second.wait() == 0, second.stderr()
    finally:
        second.stop()
    assert read_actors(runs) == submitted  # the rerun attached: it created no actor
    assert re.search(r"smoke: \d+ ok; [1-5] already done", second.stderr()), second.stderr()
    table = runs_table(db)
    assert_all_ok(table, runs)
    for run_id in table:  # no run trained twice: each actor's worker trained it once, to the end
        text = log(runs, run_id)
        assert len(STARTED.findall(text)) == 1, f"{run_id}:\n{text}"
        if run_id != victim:
            assert not RESUMED.search(text), f"{run_id}:\n{text}"
    # the victim's worker stopped with its actor (at a checkpoint of its own, or killed after a periodic one)
    text = log(runs, victim)
    [step] = RESUMED.findall(text)
    assert f"checkpointed at step {step} on SIGTERM" in text or int(step) % 20 == 0, text
    assert live_actors(ray_head, list(submitted.values())) == []
