"""``scaling fit``: load runs (from the store or a CSV), fit a law, save and tabulate the result."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from scaling.laws import LAWS, FitError, fit_law, summarize
from scaling.sparsity_vertex import SparsityVertex, law_checks
from scaling.sqlquery import QueryError, read_only_statement
from scaling.store import connect, literal, save_fit

NUMERIC = ("params", "active_params", "tokens", "unique_tokens", "sparsity", "flops", "loss")  # the convention


def complete_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill the column convention's derivable columns: active = total, tokens = C/(6·N_active),
    flops = 6·N_active·D (Kaplan et al. 2020, Hoffmann et al. 2022), S = 0."""
    frame = frame.copy()
    if "active_params" not in frame and "params" in frame:
        frame["active_params"] = frame["params"]
    if "tokens" not in frame and {"flops", "active_params"} <= set(frame):
        frame["tokens"] = frame["flops"] / (6 * frame["active_params"])
    if "flops" not in frame and {"tokens", "active_params"} <= set(frame):
        frame["flops"] = 6 * frame["active_params"] * frame["tokens"]
    if "sparsity" not in frame:
        frame["sparsity"] = 0.0
    if "run_id" not in frame:
        frame["run_id"] = [f"row{i}" for i in range(len(frame))]
    return frame


def convention_columns(frame: pd.DataFrame, columns: dict[str, str] | None, source: str | Path) -> pd.DataFrame:
    """``frame`` with each convention column OURS assigned from the file's column THEIRS (``columns``: OURS →
    THEIRS, from ``--column OURS=THEIRS``); a THEIRS the file lacks is a FitError."""
    missing = [theirs for theirs in (columns or {}).values() if theirs not in frame]
    if missing:
        raise FitError(f"{source} has no column {', '.join(map(repr, missing))} "
                       f"(columns: {', '.join(map(str, frame.columns))})")
    return frame.assign(**{ours: frame[theirs] for ours, theirs in (columns or {}).items()})


def read_points(csv_path: str | Path, where: str | None = None) -> pd.DataFrame:
    """A CSV's rows, optionally only those matching ``where`` (a DuckDB SQL condition on its columns)."""
    try:
        frame = pd.read_csv(csv_path)
    except pd.errors.EmptyDataError:
        raise FitError(f"{csv_path} is empty (expected a header line and rows)") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise FitError(f"cannot read {csv_path}: {' '.join(str(e).split())}") from None
    if frame.empty:
        raise FitError(f"{csv_path} has a header but no rows")
    if where is None:
        return frame
    con = duckdb.connect()
    try:
        con.register("points", frame)
        selected = query(con, f"SELECT * FROM points WHERE {condition(where)}", [], where)
    finally:
        con.close()
    if selected.empty:
        raise FitError(f"--where {where!r} selects none of the {len(frame)} rows of {csv_path}")
    return selected


def condition(where: str) -> str:
    """A ``--where`` condition as a term of a larger query: parenthesized; a trailing ``-- comment`` ends at a
    line break before the parenthesis."""
    return f"({where}\n)" if "--" in where else f"({where})"


def query(con: duckdb.DuckDBPyConnection, sql: str, args: list, where: str | None) -> pd.DataFrame:
    """Run a query built around a user's ``--where``: exactly one read-only statement, or a one-line FitError."""
    try:
        return con.execute(read_only_statement(sql), args).df()
    except QueryError as e:
        raise FitError(f"--where {where!r}: {e}") from None
    except duckdb.Error as e:
        raise FitError(f"--where {where!r}: {str(e).splitlines()[0]}") from None


def csv_points(csv_path: str | Path, law: str, columns: dict[str, str] | None = None, where: str | None = None,
               sparsity: float | None = None) -> pd.DataFrame:
    """An external CSV's points in the shared column convention.

    ``columns`` maps convention names to the CSV's own (``{"loss": "val_loss"}``) for files exported elsewhere;
    ``where`` keeps the rows matching a SQL condition on the CSV's own columns; ``sparsity`` keeps one S."""
    frame = convention_columns(read_points(csv_path, where), columns, csv_path)
    if "loss" not in frame:
        raise FitError(f"{csv_path} has no 'loss' column (columns: {', '.join(frame.columns)})")
    duplicated = frame.duplicated()
    frame = complete_columns(numeric(frame[~duplicated], csv_path))
    if sparsity is not None:
        kept = frame[np.isclose(frame["sparsity"], sparsity, rtol=0, atol=1e-6)]
        if kept.empty:
            raise FitError(f"{csv_path} has no rows at sparsity {sparsity:g} "
                           f"(it has {levels(frame['sparsity'])})")
        frame = kept
    frame = one_sparsity(frame, law, csv_path)
    frame.attrs["duplicates"] = int(duplicated.sum())
    return frame


def fit_frame(csv_path: str | Path, law: str, columns: dict[str, str] | None = None, where: str | None = None,
              sparsity: float | None = None, **options: Any) -> dict[str, Any]:
    """Fit a law to an external CSV with the shared column convention (see ``csv_points``)."""
    points = csv_points(csv_path, law, columns, where, sparsity)
    result = fit_checked(points, law, **options)
    if points.attrs.get("duplicates"):  # a copied row would count twice, and the bootstrap overstate certainty
        result["notes"] = [*result.get("notes", []), f"{points.attrs['duplicates']} duplicate rows of {csv_path} "
                           "(every column equal to an earlier row's) were dropped: each point is fitted once"]
    return result


def numeric(frame: pd.DataFrame, source: str | Path) -> pd.DataFrame:
    """``frame`` if every convention column in it holds numbers (empty cells allowed), else a FitError naming the
    first cell that is not one (e.g. "1,000": thousands separators are not numbers)."""
    for column in (c for c in NUMERIC if c in frame and not pd.api.types.is_numeric_dtype(frame[c])):
        if pd.api.types.is_bool_dtype(frame[column]):
            continue
        bad = pd.to_numeric(frame[column], errors="coerce").isna() & frame[column].notna()
        row = int(np.flatnonzero(bad.to_numpy())[0]) if bad.any() else 0
        raise FitError(f"{source}: column {column!r} must hold numbers, but row {row + 1} has "
                       f"{frame[column].iloc[row]!r} (write numbers without thousands separators)")
    return frame


def fit_checked(frame: pd.DataFrame, law: str, **options: Any) -> dict[str, Any]:
    """``fit_law``; for the sparsity law on runs at 2+ unique-token limits, plus its cross-check against the
    isoFLOP vertices (``sparsity_vertex.law_checks``) in the notes."""
    if law != "sparsity" or "unique_tokens" not in frame or frame["unique_tokens"].nunique() < 2:
        return fit_law(frame, law, **options)
    budget, unique = options.pop("budget", None), options.pop("unique_tokens", None)
    model = LAWS[law](**options).fit(frame)
    result = summarize(model, law, budget, unique)
    try:
        vertex = SparsityVertex(**{k: options[k] for k in ("bootstrap", "seed", "level") if k in options}).fit(frame)
        result["notes"] += law_checks(model, vertex, frame)
    except FitError as e:
        result["notes"].append(f"not cross-checked against the isoFLOP vertices: {e}")
    return result


def levels(sparsity: pd.Series) -> str:
    return ", ".join(f"{s:g}" for s in sorted(sparsity.dropna().unique()))


def one_sparsity(frame: pd.DataFrame, law: str, source: str | Path) -> pd.DataFrame:
    """The points, unless ``law`` knows nothing of sparsity and they mix several levels."""
    if law in LAWS and not LAWS[law].uses_sparsity and frame["sparsity"].nunique() > 1:
        raise FitError(f"the {law} law fits one sparsity at a time and {source} has runs at sparsities "
                       f"{levels(frame['sparsity'])}: choose one with --sparsity (or fit --law sparsity or "
                       "envelope, which model sparsity)")
    return frame


def points_sql(where: str | None = None, sparsity: float | None = None, sweep: str = "?") -> str:
    """The store query behind a fit of one sweep's finished runs; ``sweep``: the name as a SQL literal, or a
    parameter placeholder."""
    conditions = [f"sweep = {sweep}", "loss IS NOT NULL"]
    if sparsity is not None:
        conditions.append(f"abs(sparsity - {float(sparsity)!r}) < 1e-6")
    if where:
        conditions.append(condition(where))
    return f"SELECT * FROM isoflop_points WHERE {' AND '.join(conditions)} ORDER BY budget, active_params"


def sweep_points(db: str | None, sweep: str, where: str | None = None,
                 sparsity: float | None = None) -> pd.DataFrame:
    """A sweep's finished runs from the store's ``isoflop_points`` view, optionally selected by a SQL
    condition on its columns and by sparsity."""
    con = connect(db, read_only=True)
    try:
        frame = query(con, points_sql(where, sparsity), [sweep], where)
        every = query(con, points_sql(), [sweep], None) if frame.empty else frame
    finally:
        con.close()
    if every.empty:
        raise FitError(f"sweep {sweep!r} has no finished runs in the store (run `scaling run` first)")
    if frame.empty:
        chosen = " and ".join(x for x in (where and f"--where {where!r}",
                                           sparsity is not None and f"--sparsity {sparsity:g}") if x)
        raise FitError(f"{chosen} selects none of sweep {sweep!r}'s {len(every)} finished runs "
                       f"(sparsities: {levels(every['sparsity'])})")
    return frame


FIT_ARGUMENTS = tuple(p.name for p in inspect.signature(fit_law).parameters.values() if p.kind is p.KEYWORD_ONLY)
"""``fit_law``'s own arguments; every other option is the law's (``--freeze``, ``--weighted``), saved to refit it."""


def fit_sweep(db: str | None, sweep: str, law: str, where: str | None = None, sparsity: float | None = None,
              **options: Any) -> dict[str, Any]:
    """Fit a law to a sweep's finished runs (optionally selected) and save it in the ``fits`` table."""
    frame = one_sparsity(sweep_points(db, sweep, where, sparsity), law, f"sweep {sweep!r}")
    result = fit_checked(frame, law, **options)
    result["options"] = {k: v for k, v in options.items() if k not in FIT_ARGUMENTS}  # to refit it (predict)
    con = connect(db)
    try:
        save_fit(con, sweep, result, selection=points_sql(where, sparsity, literal(sweep)))
    finally:
        con.close()
    return result

