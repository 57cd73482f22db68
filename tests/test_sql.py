"""``scaling sql`` and ``scaling export`` as a user runs them, on a real store of synthetic runs.

``build_store`` (planned with ``scaling.grid``, run files as the trainer writes them, ingested by the store) is
shared with ``test_report``.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from test_plots import loss_law

from scaling.config import parse_sweep
from scaling.grid import plan
from scaling.store import connect, ingest_run, register_plan

SWEEP = {"name": "rep", "budgets": [3e10, 1e11, 3e11], "unique_tokens": 150_000, "context": 32, "min_steps": 10,
         "max_epochs": 50, "sparsity": {"experts": [1, 2, 4, 8]}, "sizes": {"count": 5, "span": 12},
         "shape": {"aspect_ratio": 16, "head_dim": 8, "min_d_model": 16}, "train": {"batch_size": 8},
         "repeat": {"seeds": [1], "budgets": [1e11]}}
POSITIONS = 256
SCALING = shutil.which("scaling") or str(Path(sys.executable).parent / "scaling")
SMALL = {**SWEEP, "name": "small", "budgets": [1e11, 3e11], "sparsity": {"experts": [1, 4]}, "sizes": {"count": 3},
         "repeat": {}}
COUNT = "SELECT count(*) AS n FROM runs"


def write_run(run_dir: Path, run: dict, rng: np.random.Generator, difficulty: np.ndarray,
              status: str = "ok") -> None:
    """A run's result.json and token_losses.npz as ``scaling.train`` writes them, losses from ``loss_law``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = float(loss_law(run["active_params"], run["params"], run["tokens"], run["unique_tokens"], run["sparsity"])
                  + rng.normal(0, 0.01))
    gap = 0.01 * run["epochs"] * (1 + run["sparsity"])
    speed = 2e4 / (1 + 0.3 * run["sparsity"])
    steps = np.unique(np.geomspace(1, run["steps"], 12).astype(int))
    curve = final + (np.log(256) - final) * np.exp(-8 * np.sqrt(steps / run["steps"]))
    tokens = steps * run["tokens"] // run["steps"]
    metrics = [{"step": int(s), "tokens": int(t), "train_loss": float(c - gap), "ce_loss": float(c - gap),
                "aux_loss": 0.01, "z_loss": 0.001, "eval_loss": float(c), "lr": 1e-3, "wall_s": float(t / speed)}
               for s, t, c in zip(steps, tokens, curve, strict=True)]
    router = [{"step": int(s), "tokens": int(t), "layer": layer, "expert": e, "load": float(load[e]),
               "entropy": 1.0, "dropped_frac": 0.0}
              for s, t in zip(steps[::4], tokens[::4], strict=True) for layer in range(run["n_layers"])
              for load in [rng.dirichlet(np.full(run["n_experts"], 5.0 + s))] for e in range(run["n_experts"])
              ] if run["n_experts"] > 1 else []
    ok = status == "ok"
    (run_dir / "result.json").write_text(json.dumps({
        "run_id": run["run_id"], "status": status, "error": None if ok else "RuntimeError: synthetic failure",
        "diverged_step": None, "steps": run["steps"], "tokens_seen": run["tokens"], "epochs_done": run["epochs"],
        "final_train_loss": final - gap if ok else None, "final_eval_loss": final if ok else None,
        "wall_s": run["tokens"] / speed, "train_s": run["tokens"] / speed, "tokens_per_s": speed,
        "flops_per_s": run["flops"] / (run["tokens"] / speed), "started_at": "2026-01-01T00:00:00",
        "finished_at": "2026-01-01T00:01:00", "metrics": metrics if ok else [], "router": router if ok else []}))
    checkpoints = np.arange(len(steps))[-3:]
    losses = np.stack([difficulty * curve[i] / difficulty.mean() + rng.normal(0, 0.3, POSITIONS)
                       for i in checkpoints])
    if ok:
        np.savez(run_dir / "token_losses.npz", steps=steps[checkpoints], tokens=tokens[checkpoints],
                 eval_loss=curve[checkpoints], losses=losses.astype(np.float32))


def build_store(tmp: Path, raw: dict = SWEEP, failed: int = 1) -> Path:
    """Plan ``raw``, write every run's files (the last ``failed`` runs failed), ingest; returns the closed store."""
    sweep = parse_sweep(raw)
    runs = plan(sweep).runs
    db = tmp / f"{sweep.name}.duckdb"
    con = connect(db)
    register_plan(con, sweep, runs, tmp / "runs")
    rng = np.random.default_rng(0)
    difficulty = rng.gamma(2.0, 1.0, POSITIONS)
    for i, run in enumerate(runs.to_dict("records")):
        run_dir = tmp / "runs" / run["run_id"]
        write_run(run_dir, run, rng, difficulty, "failed" if i >= len(runs) - failed else "ok")
        ingest_run(con, run_dir)
    con.close()
    return db



@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    return str(build_store(tmp_path_factory.mktemp("sql"), SMALL))


def scaling(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCALING, *args], capture_output=True, text=True, timeout=120)


def test_table_csv_json(db):
    query = "SELECT run_id, sparsity, loss FROM isoflop_points ORDER BY run_id"
    table = scaling("sql", query, "--db", db)
    assert table.returncode == 0 and "run_id" in table.stdout and "sparsity" in table.stdout
    csv = scaling("sql", query, "--db", db, "--format", "csv")
    frame = pd.read_csv(io.StringIO(csv.stdout))
    assert csv.returncode == 0 and list(frame.columns) == ["run_id", "sparsity", "loss"] and len(frame) == 11
    rows = json.loads(scaling("sql", query, "--db", db, "--format", "json").stdout)
    assert [r["run_id"] for r in rows] == list(frame.run_id)


def test_parquet_out(db, tmp_path):
    out = tmp_path / "f.parquet"
    result = scaling("sql", "SELECT * FROM final_losses", "--db", db, "--format", "parquet", "--out", str(out))
    assert result.returncode == 0 and result.stdout == ""
    assert duckdb.sql(f"SELECT count(*) FROM '{out}'").fetchall()[0][0] == 11


def test_schema_lists_tables_and_views(db):
    result = scaling("sql", "--schema", "--db", db, "--format", "csv")
    schema = pd.read_csv(io.StringIO(result.stdout))
    kinds = schema.drop_duplicates("table_name").set_index("table_name")["kind"]
    for view in ("final_losses", "isoflop_points", "training_curves", "token_losses", "fit_params"):
        assert kinds[view] == "view"
    for table in ("runs", "router_stats", "sweeps", "fits", "metrics"):
        assert kinds[table] == "table"


def test_bad_sql_is_one_line(db):
    result = scaling("sql", "SELEC * FROM runs", "--db", db)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Parser Error" in lines[0] and "Traceback" not in result.stderr
    missing = scaling("sql", "SELECT nope FROM runs", "--db", db)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1 and "nope" in missing.stderr


@pytest.mark.parametrize("statement", [
    "INSERT INTO runs (run_id, status) VALUES ('x', 'ok')",
    "DELETE FROM runs",
    "DROP TABLE runs",
    "CREATE TABLE t AS SELECT 1",
    "  /* sneaky */ DELETE FROM runs",
    "SELECT 1; DROP VIEW final_losses",
])
def test_writes_are_refused(db, statement):
    result = scaling("sql", statement, "--db", db)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    con = duckdb.connect(db, read_only=True)
    assert con.execute(COUNT).fetchall()[0][0] == 12
    assert con.execute("SELECT count(*) FROM final_losses").fetchall()[0][0] == 11
    con.close()


def test_export_writes_parquet(db, tmp_path):
    result = scaling("export", "small", "--to", str(tmp_path / "export"), "--db", db)
    assert result.returncode == 0
    files = {Path(line).name for line in result.stdout.split()}
    assert {"runs.parquet", "metrics.parquet", "router_stats.parquet", "token_losses.parquet"} <= files
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'export' / 'runs.parquet'}'").fetchall()[0][0] == 12
    unknown = scaling("export", "nope", "--to", str(tmp_path / "x"), "--db", db)
    assert unknown.returncode == 1 and "no sweep named 'nope'" in unknown.stderr
