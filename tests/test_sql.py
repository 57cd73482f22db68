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
from conftest import cli_in_process
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


def one_line_refusal(result: subprocess.CompletedProcess) -> str:
    """A refusal as users see it: exit 1, nothing on stdout, one line on stderr; returns that line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and result.stdout == "" and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("statement, kind", [
    ("SELECT 1; COPY (SELECT 'x') TO '{target}' (FORMAT csv)", "2 statements"),
    ("/**/ COPY (SELECT 'x') TO '{target}' (FORMAT csv)", "not COPY"),
    ("-- a comment first\nCOPY (SELECT 'x') TO '{target}'", "not COPY"),
    ("SELECT 1; EXPORT DATABASE '{target}'", "2 statements"),
    ("EXPORT DATABASE '{target}'", "not EXPORT"),
    ("SELECT 1; SET threads = 1", "2 statements"),
    ("SET threads = 1", "not SET"),
    ("SELECT 1; PRAGMA version", "2 statements"),
    ("PRAGMA enable_profiling", "not PRAGMA"),
    ("SELECT 1; INSTALL httpfs", "2 statements"),
    ("INSTALL httpfs", "not LOAD"),
    ("LOAD httpfs", "not LOAD"),
    ("ATTACH '{target}' AS other", "not ATTACH"),
    ("SELECT 1; ATTACH '{target}' AS other", "2 statements"),
    ("CALL pragma_version()", "not CALL"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{target}'", "not EXPLAIN"),
])
def test_only_one_read_only_statement_runs(db, tmp_path, monkeypatch, capsys, statement, kind):
    """The write guard's probes: DuckDB's parser decides, so comments first or a second statement hide nothing;
    the target file is never written."""
    target = tmp_path / "target.out"
    line = one_line_refusal(cli_in_process(monkeypatch, capsys, "sql", "--db", db, "--",
                                           statement.format(target=target)))
    assert kind in line and not target.exists()


def test_copy_over_the_results_file_is_refused(db, tmp_path):
    """``/**/ COPY ... TO 'results.duckdb'`` once overwrote the store with CSV: the store is intact."""
    copy = tmp_path / "results.duckdb"
    shutil.copy(db, copy)
    before = copy.read_bytes()
    for statement in (f"/**/ COPY (SELECT 'x') TO '{copy}' (FORMAT csv)",
                      f"SELECT 1; COPY (SELECT 'x') TO '{copy}' (FORMAT csv)"):
        one_line_refusal(scaling("sql", statement, "--db", str(copy)))
    assert copy.read_bytes() == before
    assert scaling("sql", COUNT, "--db", str(copy), "--format", "csv").stdout.split() == ["n", "12"]


@pytest.mark.parametrize("statement", [
    "/* counted */ SELECT count(*) AS n FROM runs;",
    "SELECT count(*) AS n FROM runs -- every run\n;",
    "WITH r AS (SELECT * FROM runs) SELECT count(*) AS n FROM r",
    "FROM runs SELECT count(*) AS n",
])
def test_comments_and_a_trailing_semicolon_are_allowed(db, monkeypatch, capsys, statement):
    result = cli_in_process(monkeypatch, capsys, "sql", statement, "--db", db, "--format", "csv")
    assert result.returncode == 0 and result.stdout.split() == ["n", "12"], result.stderr


def test_empty_query_is_refused(db, monkeypatch, capsys):
    assert "no SQL statement" in one_line_refusal(cli_in_process(monkeypatch, capsys, "sql", "--db", db, "--", "-- x"))


@pytest.fixture
def points_csv(tmp_path) -> Path:
    path = tmp_path / "points.csv"
    pd.DataFrame({"params": [1e6, 2e6, 4e6] * 3, "flops": [1e15] * 3 + [1e16] * 3 + [1e17] * 3,
                  "loss": [3.1, 3.0, 3.2, 2.9, 2.8, 2.9, 2.7, 2.6, 2.65]}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("where", [
    "1=1; COPY (SELECT 'x') TO '{target}' (FORMAT csv)",
    "1=1); COPY (SELECT 'x') TO '{target}' (FORMAT csv); SELECT (1",
    "1=1) ; ATTACH '{target}' AS other; SELECT (1",
])
def test_fit_where_runs_one_read_only_statement(db, tmp_path, monkeypatch, capsys, points_csv, where):
    """``--where`` is a condition inside the fit's one query: a second statement is refused for a CSV and for a
    sweep in the store, and writes nothing."""
    target = tmp_path / "target.out"
    condition = where.format(target=target)
    for source in (["--csv", str(points_csv)], ["small", "--db", db]):
        line = one_line_refusal(cli_in_process(monkeypatch, capsys, "fit", *source, "--law", "isoflop",
                                           "--where", condition))
        assert "--where" in line and not target.exists(), line


def test_fit_where_allows_a_trailing_comment(points_csv):
    result = scaling("fit", "--csv", str(points_csv), "--law", "isoflop", "--format", "json",
                     "--where", "flops > 1e15 -- the two largest budgets")
    assert result.returncode == 0 and json.loads(result.stdout)["n_points"] == 6, result.stderr


@pytest.mark.slow
def test_saved_selection_is_text_never_run(db, tmp_path):
    """A fit's selection (with the user's --where) is stored as text for people to read; nothing executes it:
    a stored selection that would write a file, rendered by a report and read back by ``scaling sql``, writes
    nothing."""
    copy = tmp_path / "results.duckdb"
    shutil.copy(db, copy)
    target = tmp_path / "target.out"
    con = duckdb.connect(str(copy))
    con.execute("UPDATE fits SET selection = ?", [f"COPY (SELECT 'x') TO '{target}'"])
    con.execute("INSERT INTO fits (fit_id, sweep, law, selection) VALUES ('x', 'small', 'isoflop', ?)",
                [f"COPY (SELECT 'x') TO '{target}'"])
    con.close()
    assert scaling("sql", "SELECT selection FROM fit_params", "--db", str(copy)).returncode == 0
    report = scaling("report", "small", "--db", str(copy), "--out", str(tmp_path / "report"), "--bootstrap", "0")
    assert report.returncode == 0, report.stderr
    assert not target.exists()
