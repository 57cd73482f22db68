"""``scaling sql`` and ``scaling export``: read-only SQL over the store, Parquet export."""

from __future__ import annotations

import sys
from pathlib import Path

import duckdb

from scaling.output import emit, err
from scaling.store import connect, schema


class QueryError(ValueError):
    """User SQL that is not exactly one read-only query."""


def read_only_statement(text: str) -> str:
    """``text`` if DuckDB's own parser finds exactly one SELECT-like statement in it (SELECT, WITH, VALUES, FROM,
    SHOW, DESCRIBE, SUMMARIZE; comments and a trailing ``;`` allowed), else a :class:`QueryError` naming what was
    found. Every text a user gives as SQL passes here before it runs: a read-only connection still lets
    ``COPY ... TO`` write files, and ``SET``, ``PRAGMA``, ``INSTALL``/``LOAD``, ``ATTACH`` and ``EXPORT`` change
    what later statements may do; ``;`` and comments make any first-word check blind."""
    try:
        statements = duckdb.extract_statements(text)
    except duckdb.Error as e:
        raise QueryError(" ".join(str(e).split())) from None
    if not statements:
        raise QueryError("no SQL statement given")
    kinds = [s.type.name for s in statements]
    if len(statements) > 1:
        raise QueryError(f"one query at a time: found {len(statements)} statements ({', '.join(kinds)})")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise QueryError(f"only queries (SELECT, WITH, ...) are allowed here, not {kinds[0]}: the results are "
                         "read-only and nothing is written to files")
    return text


def run_query(db: str | None, query: str | None, fmt: str = "table", out: str | None = None,
              show_schema: bool = False) -> None:
    """Print a query's result (or the schema); bad SQL is DuckDB's message on one line with exit code 1."""
    con = connect(db, read_only=True)
    if show_schema:
        emit(schema(con), "csv" if fmt == "parquet" else fmt, title="tables and views")
        return
    if not query:
        fail("give a query, or --schema")
    try:
        relation = con.sql(read_only_statement(query))
        if relation is None:
            fail("the statement returned no rows")
        if fmt == "parquet":
            if not out:
                fail("--format parquet needs --out FILE")
            relation.write_parquet(out)
            err(f"wrote {out}")
            return
        frame = relation.df()
    except QueryError as e:
        fail(str(e))
    except duckdb.Error as e:
        fail(" ".join(str(e).split()))
    if out:
        with open(out, "w") as fh:
            sys.stdout, saved = fh, sys.stdout
            try:
                emit(frame, fmt)
            finally:
                sys.stdout = saved
        err(f"wrote {out}")
    else:
        emit(frame, fmt)


def fail(message: str) -> None:
    err(f"error: {message}")
    sys.exit(1)


def export_parquet(db: str | None, sweep: str, to: Path) -> list[Path]:
    """Every table and view restricted to the sweep's runs, one Parquet file each."""
    con = connect(db, read_only=True)
    if con.execute("SELECT count(*) FROM sweeps WHERE name = ?", [sweep]).fetchall()[0][0] == 0:
        fail(f"no sweep named {sweep!r} in the store")
    to.mkdir(parents=True, exist_ok=True)
    runs = "(SELECT run_id FROM sweep_runs WHERE sweep = $sweep)"
    queries = {
        "sweeps": "SELECT * FROM sweeps WHERE name = $sweep",
        "runs": f"SELECT * FROM runs WHERE run_id IN {runs}",
        "sweep_runs": "SELECT * FROM sweep_runs WHERE sweep = $sweep",
        "metrics": f"SELECT * FROM metrics WHERE run_id IN {runs}",
        "router_stats": f"SELECT * FROM router_stats WHERE run_id IN {runs}",
        "token_losses": f"SELECT * FROM token_loss_arrays WHERE run_id IN {runs}",
        "fits": "SELECT * FROM fits WHERE sweep = $sweep",
        "fit_params": "SELECT * FROM fit_params WHERE sweep = $sweep",
    }
    paths = []
    for name, query in queries.items():
        path = to / f"{name}.parquet"
        con.sql(query, params={"sweep": sweep}).write_parquet(str(path))
        paths.append(path)
    return paths
