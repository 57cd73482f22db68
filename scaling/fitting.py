"""``scaling fit``: load runs (from the store or a CSV), fit a law, save and tabulate the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from scaling.laws import FitError, fit_law
from scaling.store import connect, save_fit

POINTS_SQL = "SELECT * FROM isoflop_points WHERE sweep = ? AND loss IS NOT NULL ORDER BY budget, active_params"


def complete_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill the column convention's derivable columns: tokens = C/(6N), flops = 6ND, active = total, S = 0."""
    frame = frame.copy()
    if "tokens" not in frame and {"flops", "params"} <= set(frame):
        frame["tokens"] = frame["flops"] / (6 * frame["params"])
    if "flops" not in frame and {"tokens", "params"} <= set(frame):
        frame["flops"] = 6 * frame["params"] * frame["tokens"]
    if "active_params" not in frame and "params" in frame:
        frame["active_params"] = frame["params"]
    if "sparsity" not in frame:
        frame["sparsity"] = 0.0
    if "run_id" not in frame:
        frame["run_id"] = [f"row{i}" for i in range(len(frame))]
    return frame


def read_points(csv_path: str | Path, where: str | None = None) -> pd.DataFrame:
    """A CSV's rows, optionally only those matching ``where`` (a DuckDB SQL condition on its columns)."""
    try:
        frame = pd.read_csv(csv_path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise FitError(f"cannot read {csv_path}: {e}") from None
    if where is None:
        return frame
    con = duckdb.connect()
    try:
        con.register("points", frame)
        selected = con.execute(f"SELECT * FROM points WHERE {where}").df()
    except duckdb.Error as e:
        raise FitError(f"--where {where!r}: {str(e).splitlines()[0]}") from None
    finally:
        con.close()
    if selected.empty:
        raise FitError(f"--where {where!r} selects none of the {len(frame)} rows of {csv_path}")
    return selected


def fit_frame(csv_path: str | Path, law: str, columns: dict[str, str] | None = None, where: str | None = None,
              **options: Any) -> dict[str, Any]:
    """Fit a law to an external CSV with the shared column convention.

    ``columns`` maps convention names to the CSV's own (``{"loss": "val_loss"}``) for files exported elsewhere;
    ``where`` keeps the rows matching a SQL condition on the CSV's own columns."""
    frame = read_points(csv_path, where)
    missing = [theirs for theirs in (columns or {}).values() if theirs not in frame]
    if missing:
        raise FitError(f"{csv_path} has no column {', '.join(map(repr, missing))} "
                       f"(columns: {', '.join(frame.columns)})")
    frame = frame.rename(columns={theirs: ours for ours, theirs in (columns or {}).items()})
    if "loss" not in frame:
        raise FitError(f"{csv_path} has no 'loss' column (columns: {', '.join(frame.columns)})")
    return fit_law(complete_columns(frame), law, **options)


def sweep_points(db: str | None, sweep: str) -> pd.DataFrame:
    con = connect(db, read_only=True)
    try:
        frame = con.execute(POINTS_SQL, [sweep]).df()
    finally:
        con.close()
    if frame.empty:
        raise FitError(f"sweep {sweep!r} has no finished runs in the store (run `scaling run` first)")
    return frame


def fit_sweep(db: str | None, sweep: str, law: str, **options: Any) -> dict[str, Any]:
    """Fit a law to a sweep's finished runs and save it in the ``fits`` table."""
    result = fit_law(sweep_points(db, sweep), law, **options)
    con = connect(db)
    try:
        save_fit(con, sweep, result, selection=f"{POINTS_SQL.replace('?', repr(sweep))}")
    finally:
        con.close()
    return result


def result_table(result: dict[str, Any]) -> pd.DataFrame:
    """Parameters and optimum as rows: name, value, ci_lo, ci_hi."""
    rows = []
    for kind, values in (("param", result.get("params", {})), ("optimum", result.get("optimum", {}))):
        for name, value in values.items():
            if not isinstance(value, (int, float, np.floating)):
                continue
            lo, hi = (result.get("ci", {}).get(name) or [np.nan, np.nan])[:2]
            rows.append({"kind": kind, "name": name, "value": float(value), "ci_lo": lo, "ci_hi": hi})
    return pd.DataFrame(rows, columns=["kind", "name", "value", "ci_lo", "ci_hi"])
