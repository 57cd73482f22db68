"""DuckDB results store: schema, idempotent ingest of run files, views for common questions.

Workers never open the database (DuckDB allows one writer process): each run writes files into its run
directory and the driver ingests them here. Ingest replaces everything stored for a run_id, so re-ingesting the
same files is harmless. Per-token eval losses are stored as FLOAT[] arrays, one row per (run, checkpoint), in
``token_loss_arrays``; the ``token_losses`` view unnests them (one row per position).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from scaling.config import RunSpec, SweepConfig
from scaling.grid import COLUMNS as PLAN_COLUMNS
from scaling.laws import result_rows
from scaling.runfiles import ROUTER_STATS, DamagedRunFile, read_finished, set_aside

SCHEMA_VERSION = 4
DEFAULT_DB = "scaling.duckdb"


class StoreError(RuntimeError):
    """A store problem phrased for the user."""


RUN_COLUMNS = {
    "run_id": "VARCHAR PRIMARY KEY", "status": "VARCHAR NOT NULL", "attempts": "INTEGER DEFAULT 0",
    "error": "VARCHAR", "flops": "DOUBLE", "flops_6nd": "DOUBLE", "params": "BIGINT",
    "active_params": "BIGINT", "embedding_params": "BIGINT", "sparsity": "DOUBLE", "param_sparsity": "DOUBLE",
    "n_experts": "INTEGER", "top_k": "INTEGER", "d_model": "INTEGER", "n_layers": "INTEGER",
    "n_heads": "INTEGER", "lr": "DOUBLE", "steps": "INTEGER", "tokens": "BIGINT", "unique_tokens": "BIGINT",
    "epochs": "DOUBLE", "seed": "INTEGER", "threads": "INTEGER", "spec": "JSON", "run_dir": "VARCHAR",
    "final_train_loss": "DOUBLE", "final_eval_loss": "DOUBLE", "tokens_seen": "BIGINT", "epochs_done": "DOUBLE",
    "diverged_step": "INTEGER", "wall_s": "DOUBLE", "train_s": "DOUBLE", "tokens_per_s": "DOUBLE",
    "flops_per_s": "DOUBLE", "started_at": "TIMESTAMP", "finished_at": "TIMESTAMP", "ingested_at": "TIMESTAMP",
    "source": "VARCHAR DEFAULT 'trained'",
    "role": "VARCHAR DEFAULT 'run'", "trunk_id": "VARCHAR", "flops_spent": "DOUBLE",
}
PLANNED = [c for c in PLAN_COLUMNS if c not in ("run_id", "budget", "spec")]  # the key, sweep_runs', stored as JSON
RESULT = ["final_train_loss", "final_eval_loss", "tokens_seen", "epochs_done", "diverged_step", "wall_s",
          "train_s", "tokens_per_s", "flops_per_s", "started_at", "finished_at"]

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS sweeps (name VARCHAR PRIMARY KEY, path VARCHAR, config JSON, planned_at TIMESTAMP,
    n_runs INTEGER);
CREATE TABLE IF NOT EXISTS runs ({", ".join(f"{k} {v}" for k, v in RUN_COLUMNS.items())});
CREATE TABLE IF NOT EXISTS run_aliases (old_id VARCHAR PRIMARY KEY, run_id VARCHAR, reason VARCHAR);
CREATE TABLE IF NOT EXISTS sweep_runs (sweep VARCHAR, run_id VARCHAR, budget DOUBLE, PRIMARY KEY (sweep, run_id));
CREATE TABLE IF NOT EXISTS metrics (run_id VARCHAR, step INTEGER, tokens BIGINT, train_loss DOUBLE,
    ce_loss DOUBLE, aux_loss DOUBLE, z_loss DOUBLE, eval_loss DOUBLE, lr DOUBLE, wall_s DOUBLE,
    PRIMARY KEY (run_id, step));
CREATE TABLE IF NOT EXISTS router_stats (run_id VARCHAR, step INTEGER, tokens BIGINT, layer INTEGER,
    expert INTEGER, {", ".join(f"{name} DOUBLE" for name in ROUTER_STATS)}, PRIMARY KEY (run_id, step, layer, expert));
CREATE TABLE IF NOT EXISTS token_loss_arrays (run_id VARCHAR, step INTEGER, tokens BIGINT, eval_loss DOUBLE,
    losses FLOAT[], PRIMARY KEY (run_id, step));
CREATE TABLE IF NOT EXISTS fits (fit_id VARCHAR PRIMARY KEY, sweep VARCHAR, law VARCHAR, created_at TIMESTAMP,
    n_points INTEGER, objective DOUBLE, selection VARCHAR, result JSON);
CREATE TABLE IF NOT EXISTS fit_values (fit_id VARCHAR, parameter VARCHAR, value DOUBLE, ci_lo DOUBLE,
    ci_hi DOUBLE, PRIMARY KEY (fit_id, parameter));
"""

VIEWS = {
    "final_losses": """
        SELECT s.sweep, r.run_id, s.budget, r.flops, r.params, r.active_params, r.embedding_params, r.sparsity,
               r.param_sparsity, r.n_experts, r.top_k, r.d_model, r.n_layers, r.lr, r.steps, r.tokens,
               r.unique_tokens, r.epochs, r.seed, r.final_eval_loss, r.final_train_loss,
               r.final_eval_loss - r.final_train_loss AS generalization_gap, r.wall_s, r.tokens_per_s,
               r.trunk_id, r.flops_spent
        FROM runs r JOIN sweep_runs s USING (run_id) WHERE r.status = 'ok' AND r.role <> 'trunk'""",
    "isoflop_points": """
        SELECT s.sweep, s.budget, r.run_id, r.params, r.active_params, r.tokens, r.unique_tokens, r.sparsity,
               r.flops, r.final_eval_loss AS loss, r.epochs, r.seed
        FROM runs r JOIN sweep_runs s USING (run_id) WHERE r.status = 'ok' AND r.role <> 'trunk'""",
    "training_curves": """
        SELECT s.sweep, s.budget, m.run_id, r.sparsity, r.n_experts, r.top_k, r.active_params, r.params, r.seed,
               m.step, m.tokens, m.tokens / r.unique_tokens AS epochs, m.train_loss, m.ce_loss, m.aux_loss,
               m.z_loss, m.eval_loss, m.lr, m.wall_s
        FROM metrics m JOIN runs r USING (run_id) JOIN sweep_runs s USING (run_id)""",
    "token_losses": """
        SELECT run_id, step, tokens, eval_loss, unnest(range(len(losses))) AS position, unnest(losses) AS loss
        FROM token_loss_arrays""",
    "fit_params": """
        SELECT f.fit_id, f.sweep, f.law, f.created_at, v.parameter, v.value, v.ci_lo, v.ci_hi, f.selection
        FROM fits f JOIN fit_values v USING (fit_id)""",
}
VIEW_DOCS = {
    "final_losses": "one row per ok run and sweep (trunks aside): config columns and final eval/train loss",
    "isoflop_points": "the fitting convention: budget, params, active_params, tokens, unique_tokens, sparsity, "
                      "flops, loss",
    "training_curves": "every logged step of every run: tokens, train/eval loss, lr, wall seconds",
    "token_losses": "per-token eval losses at checkpoints (one row per run, checkpoint and position)",
    "fit_params": "fitted laws in long format: law, parameter, value, ci_lo, ci_hi, and the SQL selecting its runs",
}


def utcnow() -> datetime:
    """Naive UTC timestamps throughout the store."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def literal(value: str) -> str:
    """A SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def db_path(path: str | os.PathLike | None = None) -> Path:
    """``--db`` if given, else ``$SCALING_DB``, else ``scaling.duckdb`` in the working directory."""
    return Path(path or os.environ.get("SCALING_DB") or DEFAULT_DB)


def connect(path: str | os.PathLike | None = None, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open (and for writers create or migrate) the store."""
    path = db_path(path)
    if read_only and not path.exists():
        raise StoreError(f"no results database at {path} (run a sweep first, or pass --db)")
    try:
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as e:
        raise StoreError(f"cannot open {path}: {str(e).splitlines()[0]} (is a sweep writing to it? "
                         "its run files can be read directly meanwhile)") from None
    if not read_only:
        init_schema(con, path)
    else:
        check_version(con, path)
    return con


def init_schema(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    tables = {name for (name,) in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
    if tables and "meta" not in tables:
        con.close()
        raise StoreError(f"{path} is a DuckDB file of something else (tables: {', '.join(sorted(tables)[:5])}), "
                         "not a scaling results database: pass another --db")
    version = check_version(con, path) if tables else None
    if version is not None and version < SCHEMA_VERSION:
        migrate(con, version)
    con.execute(SCHEMA)
    if version is None:
        con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
    for name, sql in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")


THREAD_LINE = re.compile(r"(?:starting|resuming at step \d+) run \w+: .*, (\d+) CPU thread\(s\)$", re.M)


def recorded_threads(run_dir: Path) -> set[int]:
    """The thread counts a run's ``log.txt`` says it trained with (one per start or resume)."""
    try:
        return {int(n) for n in THREAD_LINE.findall((run_dir / "log.txt").read_text(errors="replace"))}
    except OSError:
        return set()


def resolve_threads(con: duckdb.DuckDBPyConnection) -> None:
    """Version 3: a run's thread count is part of its spec and its id (``runs.threads``; see
    ``config.V1_ONE_THREAD``). Runs planned before said ``train.threads = 0`` (cores / workers, decided at run
    time); each gets the count its ``log.txt`` records. Why re-key rather than keep the ids and record the count
    in a column: losses depend on the count, so one id must mean one count; one thread keeps its id, so the
    common case (as many one-thread workers as cores) changes nothing, and a run that ran with N > 1 threads is
    re-keyed to the id of its spec with ``threads = N``, the old id kept in ``run_aliases`` (its files stay in
    their directory). A run never started counts as one thread (the new default). A run whose log is missing
    or names several counts (resumed under another ``--workers``) keeps its id and gets ``threads`` NULL."""
    con.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS threads INTEGER")
    con.execute("CREATE TABLE IF NOT EXISTS run_aliases (old_id VARCHAR PRIMARY KEY, run_id VARCHAR, "
                "reason VARCHAR)")
    rows = con.execute("SELECT run_id, spec, run_dir, status FROM runs "
                       "WHERE CAST(json_extract(spec, '$.train.threads') AS INTEGER) = 0").fetchall()
    for run_id, spec_json, run_dir, status in rows:
        spec = json.loads(spec_json)
        counts = recorded_threads(Path(run_dir)) if run_dir else set()
        threads = counts.pop() if len(counts) == 1 else (1 if status == "planned" and not counts else None)
        spec["train"]["threads"] = threads or 1  # an unknown count keeps its id, which one thread hashes to
        new_id = RunSpec.from_dict(spec).run_id
        taken = new_id != run_id and con.execute("SELECT 1 FROM runs WHERE run_id = ?", [new_id]).fetchall()
        if taken:  # already planned and stored under its new id: the old row stays as it was
            continue
        con.execute("UPDATE runs SET spec = ?, threads = ? WHERE run_id = ?", [json.dumps(spec), threads, run_id])
        if new_id == run_id:
            continue
        for table in ("runs", "sweep_runs", "metrics", "router_stats", "token_loss_arrays"):
            con.execute(f"UPDATE {table} SET run_id = ? WHERE run_id = ?", [new_id, run_id])
        con.execute("INSERT INTO run_aliases VALUES (?, ?, ?)",
                    [run_id, new_id, f"planned with threads = 0, trained with {threads} threads"])


def add_source(con: duckdb.DuckDBPyConnection) -> None:
    """Version 2: ``runs.source`` ('trained', or the file an external run was ingested from)."""
    con.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS source VARCHAR DEFAULT 'trained'")


def add_branch_columns(con: duckdb.DuckDBPyConnection) -> None:
    """Version 4, trunks and cooldown branches: ``runs.role`` (run, trunk or branch), ``trunk_id`` and
    ``flops_spent``. Every run stored before was a dedicated run, so it spent what it represents."""
    con.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS role VARCHAR DEFAULT 'run'")
    con.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS trunk_id VARCHAR")
    con.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS flops_spent DOUBLE")
    con.execute("UPDATE runs SET role = coalesce(role, 'run'), flops_spent = coalesce(flops_spent, flops)")


# Schema version -> the step from the version before; a writer applies the missing ones in order, in one
# transaction, when it opens an older file.
MIGRATIONS = {2: add_source, 3: resolve_threads, 4: add_branch_columns}


def migrate(con: duckdb.DuckDBPyConnection, version: int) -> None:
    """Bring a file of schema ``version`` up to ``SCHEMA_VERSION``, one step at a time, in one transaction."""
    con.execute("BEGIN")
    try:
        for step in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[step](con)
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


def check_version(con: duckdb.DuckDBPyConnection, path: Path) -> int | None:
    """Schema version of the file; a newer file than this code is refused with what to do."""
    try:
        rows = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    except duckdb.CatalogException:
        raise StoreError(f"{path} is not a scaling results database (no meta table)") from None
    version = int(rows[0][0]) if rows else None
    if version is not None and version > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {version}, newer than this scaling ({SCHEMA_VERSION}): "
                         "upgrade scaling (pip install -U scaling) to read it")
    return version


def register_plan(con: duckdb.DuckDBPyConnection, sweep: SweepConfig, runs: pd.DataFrame,
                  runs_dir: Path) -> None:
    """Record a sweep and its planned runs; existing runs keep their status and results, finished ones their
    directory too (a run re-keyed by a migration keeps its files where they are)."""
    now = utcnow()
    con.execute("BEGIN")
    con.execute("INSERT OR REPLACE INTO sweeps VALUES (?, ?, ?, ?, ?)",
                [sweep.name, sweep.path, json.dumps(sweep_dict(sweep)), now, len(runs)])
    con.execute("DELETE FROM sweep_runs WHERE sweep = ?", [sweep.name])
    for row in runs.to_dict("records"):
        run_dir = str(Path(runs_dir) / row["run_id"])
        values = [None if row[c] is None or (isinstance(row[c], float) and np.isnan(row[c])) else row[c]
                  for c in PLANNED]
        con.execute(f"""INSERT INTO runs (run_id, status, attempts, {", ".join(PLANNED)}, spec, run_dir)
                        VALUES (?, 'planned', 0, {", ".join("?" * len(PLANNED))}, ?, ?)
                        ON CONFLICT DO UPDATE SET run_dir = CASE WHEN runs.status IN ('ok', 'diverged')
                            THEN runs.run_dir ELSE excluded.run_dir END""",
                    [row["run_id"], *values, json.dumps(row["spec"].to_dict()), run_dir])
        budget = None if pd.isna(row["budget"]) else row["budget"]  # a trunk is no point of any budget
        con.execute("INSERT INTO sweep_runs VALUES (?, ?, ?)", [sweep.name, row["run_id"], budget])
    con.execute("COMMIT")


def sweep_dict(sweep: SweepConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(sweep), default=str))


def mark(con: duckdb.DuckDBPyConnection, run_id: str, status: str, error: str | None = None,
         attempt: bool = False) -> None:
    con.execute(f"UPDATE runs SET status = ?, error = ?{', attempts = attempts + 1' if attempt else ''} "
                "WHERE run_id = ?", [status, error, run_id])


def ingest_run(con: duckdb.DuckDBPyConnection, run_dir: str | os.PathLike, run_id: str | None = None,
               fresh: bool = True) -> str | None:
    """Ingest one run directory's finished files; returns the run's status, or None if it has no result yet.

    Everything stored for the run is replaced in one transaction, so ingesting twice changes nothing. Files that
    do not follow the schema (``scaling.runfiles``) change nothing stored but the run's status: ``failed``, with
    a one-line reason naming the file; the damaged file and ``result.json`` are set aside (renamed), so the run
    counts as unfinished and is trained again. ``fresh``: the files are from an earlier driver (the damage is
    not an attempt's failure: the run's attempt count starts over); else they are the attempt just made.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "result.json").exists():
        return None
    expected = run_id or known_run(con, run_dir)
    try:
        result, arrays = read_finished(run_dir, expected)
    except DamagedRunFile as e:
        if expected is None:
            raise StoreError(str(e)) from None
        set_damaged_aside(con, run_dir, expected, e, fresh)
        return "failed"
    run_id = result["run_id"]
    if not con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchall():
        raise StoreError(f"{run_dir}: run {run_id} is not part of any planned sweep in this database")
    con.execute("BEGIN")
    try:
        values = [result.get(c) for c in RESULT]
        sets = ", ".join(f"{c} = ?" for c in RESULT)
        con.execute(f"UPDATE runs SET status = ?, error = ?, {sets}, ingested_at = ? WHERE run_id = ?",
                    [result["status"], result.get("error"), *values, utcnow(), run_id])
        for table in ("metrics", "router_stats", "token_loss_arrays"):
            con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
        insert_rows(con, "metrics", run_id, result.get("metrics", []),
                    ["step", "tokens", "train_loss", "ce_loss", "aux_loss", "z_loss", "eval_loss", "lr", "wall_s"],
                    key=["step"])
        insert_rows(con, "router_stats", run_id, result.get("router", []),
                    ["step", "tokens", "layer", "expert", *ROUTER_STATS],
                    key=["step", "layer", "expert"])
        if arrays is not None:
            frame = pd.DataFrame({"run_id": run_id, "step": arrays["steps"], "tokens": arrays["tokens"],
                                  "eval_loss": arrays["eval_loss"],
                                  "losses": [row.astype(np.float32) for row in arrays["losses"]]})
            con.register("token_frame", frame)
            con.execute("INSERT INTO token_loss_arrays SELECT run_id, step, tokens, eval_loss, "
                        "CAST(losses AS FLOAT[]) FROM token_frame")
            con.unregister("token_frame")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return result["status"]


def known_run(con: duckdb.DuckDBPyConnection, run_dir: Path) -> str | None:
    """The planned run whose directory ``run_dir`` is (or that is named as it is)."""
    rows = con.execute("SELECT run_id FROM runs WHERE run_dir = ? OR run_id = ? ORDER BY run_dir = ? DESC LIMIT 1",
                       [str(run_dir), run_dir.name, str(run_dir)]).fetchall()
    return rows[0][0] if rows else None


def set_damaged_aside(con: duckdb.DuckDBPyConnection, run_dir: Path, run_id: str, damage: DamagedRunFile,
                      fresh: bool) -> None:
    """Mark the run ``failed`` with the damage and rename the damaged file and ``result.json`` aside."""
    now = utcnow()
    moved = [set_aside(path, now) for path in dict.fromkeys([damage.path, run_dir / "result.json"])]
    kept = ", ".join(p.name for p in moved if p is not None)
    where = f"kept as {kept}; the run is trained again" if all(moved) else (
        "could not be renamed aside: move it away to train the run again")
    con.execute(f"UPDATE runs SET status = 'failed', error = ?{', attempts = 0' if fresh else ''} "
                "WHERE run_id = ?", [f"{damage} ({where})", run_id])


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, run_id: str, rows: list[dict],
                columns: list[str], key: list[str]) -> None:
    """Append a run's rows to ``table``; a repeated key keeps its last row."""
    if not rows:
        return
    frame = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    frame = frame.drop_duplicates(key, keep="last")
    frame.insert(0, "run_id", run_id)
    con.register("rows_frame", frame)
    con.execute(f"INSERT INTO {table} SELECT * FROM rows_frame")
    con.unregister("rows_frame")


def ingest_all(con: duckdb.DuckDBPyConnection, sweep: str | None = None) -> dict[str, int]:
    """Ingest every known run directory that has files newer than the store's copy; counts by status."""
    where = "AND run_id IN (SELECT run_id FROM sweep_runs WHERE sweep = ?)" if sweep else ""
    rows = con.execute(f"SELECT run_dir, ingested_at FROM runs WHERE run_dir IS NOT NULL {where}",  # not external
                       [sweep] if sweep else []).fetchall()
    counts: dict[str, int] = {}
    for run_dir, ingested_at in rows:
        result = Path(run_dir) / "result.json"
        if not result.exists():
            continue
        modified = datetime.fromtimestamp(result.stat().st_mtime, timezone.utc).replace(tzinfo=None)
        if ingested_at is not None and ingested_at >= modified:
            continue
        status = ingest_run(con, run_dir)
        if status is not None:
            counts[status] = counts.get(status, 0) + 1
    return counts


def save_fit(con: duckdb.DuckDBPyConnection, sweep: str, result: dict[str, Any], selection: str) -> str:
    """Store a fitted law (``laws.fit_law`` output) in ``fits``, its rows (``laws.result_rows``) in ``fit_values``."""
    created = utcnow()
    fit_id = f"{sweep}:{result['law']}:{created:%Y%m%dT%H%M%S%f}"
    con.execute("BEGIN")
    con.execute("INSERT INTO fits VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [fit_id, sweep, result["law"], created, result.get("n_points"), result.get("objective"),
                 selection, json.dumps(result, default=float)])
    for row in result_rows(result, by_name=True).itertuples():
        lo, hi = (None if pd.isna(v) else float(v) for v in (row.ci_lo, row.ci_hi))
        con.execute("INSERT OR REPLACE INTO fit_values VALUES (?, ?, ?, ?, ?)", [fit_id, row.name, row.value, lo, hi])
    con.execute("COMMIT")
    return fit_id


def runs_frame(con: duckdb.DuckDBPyConnection, sweep: str) -> pd.DataFrame:
    """All runs of a sweep with status and results."""
    return con.execute("SELECT s.budget, r.* FROM runs r JOIN sweep_runs s USING (run_id) WHERE s.sweep = ? "
                       "ORDER BY s.budget, r.sparsity, r.active_params, r.seed", [sweep]).df()


def schema(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Tables and views with their columns, views documented."""
    cols = con.execute("SELECT table_name, column_name, data_type FROM information_schema.columns "
                       "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position").df()
    kinds = dict(con.execute("SELECT table_name, table_type FROM information_schema.tables "
                             "WHERE table_schema = 'main'").fetchall())
    cols.insert(1, "kind", cols.table_name.map(lambda t: "view" if kinds.get(t) == "VIEW" else "table"))
    cols["about"] = cols.table_name.map(VIEW_DOCS).fillna("")
    return cols
