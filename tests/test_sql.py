"""``scaling sql`` and ``scaling export`` as a user runs them, on a real store of synthetic runs
(``synthetic.build_store``: planned with ``scaling.grid``, run files as the trainer writes them, ingested)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from synthetic import SMALL, build_store

SCALING = shutil.which("scaling") or str(Path(sys.executable).parent / "scaling")
COUNT = "SELECT count(*) AS n FROM runs"


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
