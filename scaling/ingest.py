"""``scaling ingest``: runs trained elsewhere (CSV, Parquet or JSON Lines) into the store as an external sweep.

One row per run in the fitting column convention (``params``, ``active_params``, ``tokens``, ``unique_tokens``,
``sparsity``, ``flops``, ``loss``; a file's own names are mapped with ``--column OURS=THEIRS``, as for
``scaling fit --csv``), plus any column the store keeps for trained runs under the same name (``n_experts``,
``seed``, ``lr``, ``final_train_loss``, ...; see ``store.PLANNED`` and ``store.RESULT``) and an optional
``budget``. Missing columns are derived as ``fitting.complete_columns`` derives them (C = 6·N_active·D) and said
so. An optional long-format curves file (``run``, ``step`` and/or ``tokens``, ``loss`` or ``eval_loss`` /
``train_loss``, optionally ``lr`` and ``wall_s``) fills ``metrics`` (and so the ``training_curves`` view).

A run is keyed by the file's ``--key`` column, else by a hash of the row's config columns (every column but the
loss and the other measured results), and stored as ``<sweep>/<key>`` with ``runs.source`` naming the file and
``runs.spec`` holding the row as the file has it. Ingesting is a diff: unchanged runs are left alone, changed
runs replaced, runs no longer in the file removed, all in one transaction; the same file twice changes nothing.
A bad file is refused with one line naming the problem before anything is written. External runs have no run
files (``run_dir`` is NULL), so ``scaling run`` never touches them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from scaling.fitting import complete_columns, convention_columns
from scaling.laws import FitError, budget_groups
from scaling.store import PLANNED, RESULT, StoreError, connect, utcnow

CONVENTION = ("params", "active_params", "tokens", "unique_tokens", "sparsity", "flops", "loss")
MEASURED = ("loss", *RESULT)  # results, not configuration: left out of the row hash
STORED = [c for c in dict.fromkeys(["params", "active_params", "tokens", "unique_tokens", "sparsity", "flops",
                                    *PLANNED, *RESULT])
          if c not in ("flops_6nd", "epochs", "started_at", "finished_at")]  # derived here, or not numbers
INTEGER = ("params", "active_params", "embedding_params", "tokens", "unique_tokens", "tokens_seen")
BIGINT_MAX = 2**63 - 1


def read_parquet(path: Path) -> pd.DataFrame:
    """A Parquet file through DuckDB (no pyarrow needed)."""
    with duckdb.connect() as con:
        return con.execute("SELECT * FROM read_parquet(?)", [str(path)]).df()


def read_json(path: Path) -> pd.DataFrame:
    """JSON Lines, or one JSON array of row objects."""
    with open(path, encoding="utf-8") as f:
        array = f.read(4096).lstrip().startswith("[")
    return pd.read_json(path, lines=not array)


CURVE_VALUES = ("step", "tokens", "loss", "eval_loss", "train_loss", "lr", "wall_s")
READERS = {".csv": pd.read_csv, ".tsv": lambda p: pd.read_csv(p, sep="\t"), ".parquet": read_parquet,
           ".pq": read_parquet, ".jsonl": lambda p: pd.read_json(p, lines=True),
           ".ndjson": lambda p: pd.read_json(p, lines=True), ".json": read_json}


class IngestError(StoreError):
    """A file that cannot be ingested; the message says which file and what is wrong."""


@dataclass
class Ingested:
    """What an ingest did."""

    sweep: str
    runs: int
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    curve_points: int = 0
    notes: list[str] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{k: v for k, v in self.__dict__.items() if k != "notes"}])


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV, TSV, Parquet or JSON Lines file (by its suffix) as a DataFrame."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise IngestError(f"{path}: unknown file type {path.suffix!r} (use {', '.join(READERS)})")
    if not path.is_file():
        raise IngestError(f"{path}: no such file")
    try:
        frame = reader(path)
    except Exception as e:  # pandas and pyarrow raise many kinds; each is the file's problem
        raise IngestError(f"{path}: cannot read it as {path.suffix[1:]}: {' '.join(str(e).split())}") from None
    if frame.empty:
        raise IngestError(f"{path}: no rows")
    return frame


def numeric(frame: pd.DataFrame, names: list[str], path: Path, columns: dict[str, str],
            required: tuple[str, ...] = ()) -> pd.DataFrame:
    """The named columns as floats; a value that is not a number, or a missing value in a ``required`` column,
    is an IngestError naming the column (the file's own name too) and the row."""
    out = frame.copy()
    for name in names:
        raw = frame[name]
        values = pd.to_numeric(raw.where(raw.astype(str).str.strip() != "", np.nan), errors="coerce")
        if raw.dtype == bool:
            values = raw.astype(float)
        theirs = f" (yours: {columns[name]!r})" if name in columns else ""
        bad = values.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise IngestError(f"{path}: column {name!r}{theirs} has a non-numeric value {raw.iloc[i]!r} in row "
                              f"{i + 1} ({int(bad.sum())} such rows)")
        if name in required and values.isna().any():
            i = int(np.flatnonzero(values.isna())[0])
            raise IngestError(f"{path}: column {name!r}{theirs} has no value in row {i + 1}")
        if not np.isfinite(values.dropna()).all():
            i = int(np.flatnonzero(~np.isfinite(values.fillna(0)))[0])
            raise IngestError(f"{path}: column {name!r}{theirs} is infinite in row {i + 1}")
        out[name] = values.astype(float)
    return out


def row_key(row: dict[str, Any]) -> str:
    """A stable hash of a row's config values (12 hex digits)."""
    text = json.dumps({k: plain(v) for k, v in sorted(row.items())}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plain(value: Any) -> Any:
    """A JSON-able scalar (NaN and NA as None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        return plain(value.item())
    return value


def run_rows(path: Path, columns: dict[str, str], key: str | None) -> tuple[pd.DataFrame, list[str]]:
    """The runs file as store rows: ``key``, the stored columns, ``budget``, ``row`` (the file's own row) and
    notes on what was derived."""
    raw = read_table(path)
    if key is not None and key not in raw:
        raise IngestError(f"{path}: no key column {key!r} (columns: {', '.join(map(str, raw.columns))})")
    try:
        frame = convention_columns(raw, columns, path)
    except FitError as e:
        raise IngestError(str(e)) from None
    missing = [c for c in ("params", "loss") if c not in frame]
    if not {"tokens", "flops"} & set(frame):
        missing.append("tokens or flops")
    if missing:
        raise IngestError(f"{path}: missing required column(s) {', '.join(missing)} (columns: "
                          f"{', '.join(map(str, raw.columns))}; map yours with --column OURS=THEIRS)")
    present = [c for c in (*STORED, "loss", "budget") if c in frame]
    frame = numeric(frame, present, path, columns, required=("params", "loss", "tokens", "flops"))
    notes = derived_notes(frame)
    frame = complete_columns(frame.drop(columns="run_id", errors="ignore"))
    check_values(frame, path)
    config = [c for c in raw.columns if c not in MEASURED and columns.get("loss") != c]
    records = raw.to_dict("records")
    keys = ([str(plain(v)) for v in raw[key]] if key is not None
            else [row_key({c: r[c] for c in config}) for r in records])
    duplicated = pd.Series(keys).duplicated(keep=False).to_numpy()
    if duplicated.any():
        rows = np.flatnonzero(duplicated)[:2] + 1
        what = f"key column {key!r}" if key else "config columns (all but loss and results)"
        raise IngestError(f"{path}: duplicate run key {keys[rows[0] - 1]!r} in rows {rows[0]} and {rows[1]} "
                          f"({int(duplicated.sum())} rows share a key; the {what} must tell runs apart"
                          f"{'' if key else ': name a unique column with --key'})")
    out = frame[[c for c in (*STORED, "loss") if c in frame]].copy()
    out["budget"] = frame["budget"] if "budget" in frame else budget_groups(frame)
    out.insert(0, "key", keys)
    out["row"] = [json.dumps({k: plain(v) for k, v in r.items()}, default=str) for r in records]
    return out.reset_index(drop=True), notes


def derived_notes(frame: pd.DataFrame) -> list[str]:
    """What ``complete_columns`` will derive, in words."""
    notes = []
    if "active_params" not in frame:
        notes.append("active_params = params (dense runs): the file has no active_params")
    if "tokens" not in frame:
        notes.append("tokens derived as D = C/(6·N_active): the file has no tokens")
    if "flops" not in frame:
        notes.append("flops derived as C = 6·N_active·D (Kaplan et al. 2020; no attention FLOPs): the file has "
                     "no flops")
    if "sparsity" not in frame:
        notes.append("sparsity = 0 (dense): the file has no sparsity")
    return notes


def check_values(frame: pd.DataFrame, path: Path) -> None:
    """Values every fit logs must be positive, sparsity in [0, 1), and counts must fit the store's BIGINT."""
    for name in ("params", "active_params", "tokens", "flops", "loss", "unique_tokens"):
        bad = frame[name] <= 0 if name in frame else pd.Series(False, index=frame.index)
        if bad.any():
            raise IngestError(f"{path}: column {name!r} must be positive; row {int(np.flatnonzero(bad)[0]) + 1} "
                              f"is {frame[name][bad].iloc[0]:g}")
    bad = (frame["sparsity"] < 0) | (frame["sparsity"] >= 1)
    if bad.any():
        raise IngestError(f"{path}: sparsity must be in [0, 1) (S = (E − k)/E); row "
                          f"{int(np.flatnonzero(bad)[0]) + 1} is {frame['sparsity'][bad].iloc[0]:g}")
    for name in INTEGER:
        if name in frame and (frame[name] > BIGINT_MAX).any():
            raise IngestError(f"{path}: column {name!r} exceeds the store's integer range (2^63 − 1)")


def curve_rows(path: Path, columns: dict[str, str], runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The long-format curves file as ``metrics`` rows keyed by the runs' ``key``; a curve of a run that is not
    in the runs file, or a step given twice, is an IngestError."""
    raw = read_table(path)
    try:
        frame = convention_columns(raw, columns, path)
    except FitError as e:
        raise IngestError(str(e)) from None
    missing = ["run"] if "run" not in frame else []
    if not {"step", "tokens"} & set(frame):
        missing.append("step or tokens")
    if not {"loss", "eval_loss", "train_loss"} & set(frame):
        missing.append("loss (or eval_loss / train_loss)")
    if missing:
        raise IngestError(f"{path}: missing required column(s) {', '.join(missing)} (columns: "
                          f"{', '.join(map(str, raw.columns))}; map yours with --curve-column OURS=THEIRS)")
    present = [c for c in CURVE_VALUES if c in frame]
    frame = numeric(frame, present, path, columns, required=tuple(c for c in ("step", "tokens") if c in frame))
    frame["run"] = [str(plain(v)) for v in frame["run"]]
    unknown = sorted(set(frame["run"]) - set(runs["key"]))
    if unknown:
        raise IngestError(f"{path}: curve of run {unknown[0]!r}, which is not in the runs file "
                          f"({len(unknown)} such run{'s' * (len(unknown) > 1)}; runs are named by the --key column)")
    notes = []
    if "eval_loss" not in frame and "loss" in frame:
        frame["eval_loss"] = frame["loss"]
        notes.append("curve column loss stored as eval_loss (the loss the runs file's final loss is)")
    order = "step" if "step" in frame else "tokens"
    frame = frame.sort_values(["run", order], kind="stable")
    if "step" not in frame:
        frame["step"] = frame.groupby("run").cumcount()
        notes.append("curves have no step: steps numbered 0, 1, ... in token order")
    if "tokens" not in frame:
        total = runs.set_index("key")["tokens"]
        last = frame.groupby("run")["step"].transform("max")
        frame["tokens"] = frame["step"] / last.where(last > 0, np.nan) * frame["run"].map(total)
        notes.append("curves have no tokens: tokens = D·step/last step (a constant batch size)")
    dup = frame.duplicated(["run", "step"], keep=False).to_numpy()
    if dup.any():
        row = frame[dup].iloc[0]
        raise IngestError(f"{path}: run {row['run']!r} has step {row['step']:g} more than once "
                          f"({int(dup.sum())} duplicated rows)")
    keep = ["run", "step", "tokens", "train_loss", "eval_loss", "lr", "wall_s"]
    return frame.reindex(columns=keep).reset_index(drop=True), notes


def digest(run: dict[str, Any], curve: pd.DataFrame | None) -> str:
    """What a stored run is made of, to tell an unchanged run from a changed one."""
    parts = [json.dumps({k: plain(v) for k, v in run.items()}, sort_keys=True, default=str)]
    if curve is not None:
        parts.append(curve.drop(columns="run").to_json(orient="values", double_precision=15))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def ingest_file(db: str | None, path: str | Path, sweep: str, columns: dict[str, str] | None = None,
                key: str | None = None, curves: str | Path | None = None,
                curve_columns: dict[str, str] | None = None) -> Ingested:
    """Ingest a runs file (and optionally its curves) as the external sweep ``sweep``: a diff against what is
    stored, in one transaction; nothing is written when the file is refused or nothing changed."""
    path, columns = Path(path), dict(columns or {})
    if curves is not None and key is None:
        raise IngestError("--curves needs --key COLUMN: the runs file's column that the curves' run column names")
    runs, notes = run_rows(path, columns, key)
    curve_frame = None
    if curves is not None:
        curve_frame, curve_notes = curve_rows(Path(curves), dict(curve_columns or {}), runs)
        notes += curve_notes
    by_run = dict(tuple(curve_frame.groupby("run"))) if curve_frame is not None else {}
    runs["run_id"] = [f"{sweep}/{k}" for k in runs["key"]]
    runs["digest"] = [digest(r, by_run.get(r["key"])) for r in runs.drop(columns=["run_id"]).to_dict("records")]
    config = {"source": "external", "file": str(path.resolve()), "curves": str(Path(curves).resolve())
              if curves else None, "columns": columns, "curve_columns": dict(curve_columns or {}), "key": key,
              "derived": notes}
    con = connect(db)
    try:
        return store_runs(con, sweep, path, runs, by_run, config, notes)
    finally:
        con.close()


def store_runs(con: duckdb.DuckDBPyConnection, sweep: str, path: Path, runs: pd.DataFrame,
               curves: dict[str, pd.DataFrame], config: dict[str, Any], notes: list[str]) -> Ingested:
    """Write the diff between ``runs`` and what the store holds for ``sweep`` (one transaction)."""
    existing = con.execute("SELECT config FROM sweeps WHERE name = ?", [sweep]).fetchall()
    if existing and json.loads(existing[0][0] or "{}").get("source") != "external":
        raise IngestError(f"sweep {sweep!r} exists and was planned from a sweep file, not ingested: choose "
                          "another --sweep name")
    stored = dict(con.execute("""SELECT r.run_id, json_extract_string(r.spec, '$.digest')
                                 FROM runs r JOIN sweep_runs s USING (run_id) WHERE s.sweep = ?""",
                              [sweep]).fetchall())
    budgets = dict(con.execute("SELECT run_id, budget FROM sweep_runs WHERE sweep = ?", [sweep]).fetchall())
    new = runs[~runs["run_id"].isin(list(stored))]
    changed = runs[runs["run_id"].isin(list(stored))
                   & (runs["digest"] != runs["run_id"].map(stored))]
    removed = sorted(set(stored) - set(runs["run_id"]))
    out = Ingested(sweep, len(runs), added=len(new), updated=len(changed), removed=len(removed),
                   unchanged=len(runs) - len(new) - len(changed),
                   curve_points=int(sum(len(c) for c in curves.values())), notes=notes)
    same_budgets = all(budgets.get(r) == b for r, b in zip(runs["run_id"], runs["budget"], strict=True))
    same_config = existing and json.loads(existing[0][0]) == json.loads(json.dumps(config))
    if new.empty and changed.empty and not removed and same_budgets and same_config:
        return out
    con.execute("BEGIN")
    try:
        con.execute("INSERT OR REPLACE INTO sweeps VALUES (?, ?, ?, ?, ?)",
                    [sweep, config["file"], json.dumps(config), utcnow(), len(runs)])
        gone = [*removed, *changed["run_id"]]
        for table in ("metrics", "runs"):
            con.execute(f"DELETE FROM {table} WHERE list_contains(?, run_id)", [gone])
        con.execute("DELETE FROM sweep_runs WHERE sweep = ?", [sweep])
        write = pd.concat([new, changed])
        if len(write):
            insert_runs(con, write, path)
            rows = [curves[k].assign(run_id=r) for k, r in zip(write["key"], write["run_id"], strict=True)
                    if k in curves]
            if rows:
                insert_curves(con, pd.concat(rows, ignore_index=True))
        con.register("membership", runs[["run_id", "budget"]].assign(sweep=sweep))
        con.execute("INSERT INTO sweep_runs SELECT sweep, run_id, budget FROM membership")
        con.unregister("membership")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return out


def insert_runs(con: duckdb.DuckDBPyConnection, runs: pd.DataFrame, path: Path) -> None:
    """External runs: status ok, the final loss as final_eval_loss, flops_6nd and epochs derived, no run dir."""
    columns = [c for c in STORED if c in runs]
    frame = runs[columns].copy()
    frame["run_id"] = runs["run_id"].to_numpy()
    frame["final_eval_loss"] = runs["loss"].to_numpy() if "loss" in runs else np.nan
    frame["flops_6nd"] = 6 * runs["active_params"] * runs["tokens"]
    frame["epochs"] = runs["tokens"] / runs["unique_tokens"] if "unique_tokens" in runs else np.nan
    frame["spec"] = [json.dumps({"key": k, "row": json.loads(r), "digest": d})
                     for k, r, d in zip(runs["key"], runs["row"], runs["digest"], strict=True)]
    frame["source"] = str(path.resolve())
    frame["ingested_at"] = utcnow()
    names = [c for c in frame.columns]
    con.register("external_runs", frame)
    con.execute(f"""INSERT INTO runs (status, attempts, {", ".join(names)})
                    SELECT 'ok', 0, {", ".join(names)} FROM external_runs""")
    con.unregister("external_runs")


def insert_curves(con: duckdb.DuckDBPyConnection, curves: pd.DataFrame) -> None:
    con.register("external_curves", curves)
    con.execute("""INSERT INTO metrics (run_id, step, tokens, train_loss, eval_loss, lr, wall_s)
                   SELECT run_id, step, tokens, train_loss, eval_loss, lr, wall_s FROM external_curves""")
    con.unregister("external_curves")
