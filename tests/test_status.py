"""``scaling status``: counts by status, failures with their first error line, slowest runs; csv and json print
nothing but the data."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from scaling.config import load_sweep
from scaling.grid import plan
from scaling.store import connect, mark, register_plan

ROOT = Path(__file__).resolve().parents[1]
SCALING = shutil.which("scaling") or str(Path(sys.executable).parent / "scaling")
SMOKE = ROOT / "sweeps" / "smoke.toml"


def scaling(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCALING, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, list[str]]:
    """The smoke sweep planned into a store: two runs ok, one failed, one diverged, one interrupted."""
    path = tmp_path_factory.mktemp("status") / "results.duckdb"
    sweep = load_sweep(SMOKE)
    runs = plan(sweep).runs
    ids = list(runs.run_id)
    con = connect(path)
    register_plan(con, sweep, runs, path.parent / "runs")
    for run_id, wall_s in ((ids[0], 12.5), (ids[1], 30.0)):
        con.execute("UPDATE runs SET status = 'ok', attempts = 1, wall_s = ?, tokens_per_s = 1e5 WHERE run_id = ?",
                    [wall_s, run_id])
    mark(con, ids[2], "failed", "RuntimeError: out of memory\nTraceback (most recent call last):\n  ...",
         attempt=True)
    mark(con, ids[3], "diverged", "non-finite loss at step 12")
    mark(con, ids[4], "interrupted", "interrupted by the user")
    con.close()
    return str(path), ids


def test_table_shows_counts_failures_and_slowest(store):
    db, ids = store
    result = scaling("status", "sweeps/smoke.toml", "--db", db)
    assert result.returncode == 0, result.stderr
    for needle in ("counts", "failures", "slowest", "RuntimeError: out of memory", "non-finite loss at step 12"):
        assert needle in result.stdout
    assert "Traceback" not in result.stdout


def test_csv_is_one_table(store):
    db, ids = store
    result = scaling("status", "smoke", "--db", db, "--format", "csv")
    assert result.returncode == 0 and result.stderr == ""
    frame = pd.read_csv(io.StringIO(result.stdout))
    assert frame.columns[0] == "table" and set(frame.table) == {"counts", "failures", "slowest"}
    counts = frame[frame.table == "counts"].set_index("status").runs.to_dict()
    assert counts == {"ok": 2, "failed": 1, "diverged": 1, "interrupted": 1, "planned": 1}
    failures = frame[frame.table == "failures"].set_index("run_id")
    assert failures.loc[ids[2], "error"] == "RuntimeError: out of memory"  # the first line only
    assert failures.loc[ids[2], "attempts"] == 1
    assert list(frame[frame.table == "slowest"].run_id) == [ids[1], ids[0]]


def test_json_is_one_object(store):
    db, ids = store
    result = scaling("status", "--db", db, "--format", "json")
    assert result.returncode == 0 and result.stderr == ""
    data = json.loads(result.stdout)
    assert sorted(data) == ["counts", "failures", "slowest"]
    assert sum(row["runs"] for row in data["counts"]) == 6
    assert {row["run_id"]: row["status"] for row in data["failures"]} == {
        ids[2]: "failed", ids[3]: "diverged", ids[4]: "interrupted"}
    assert [row["run_id"] for row in data["slowest"]] == [ids[1], ids[0]]


def test_unknown_sweep_is_one_line(store):
    db, _ = store
    result = scaling("status", "nosuch", "--db", db)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == "error: no sweep named 'nosuch' in this database (sweeps: smoke)"
