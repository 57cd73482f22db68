"""The ``scaling`` command: thin — parse, call the pipeline modules, print."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from scaling.config import ConfigError, RunSpec, SweepConfig, load_sweep
from scaling.executors import BACKENDS, Option
from scaling.output import FORMATS, emit, emit_json, err

FORMAT = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                      help="table for people; csv or json for scripts")
DB = click.option("--db", type=click.Path(dir_okay=False), default=None,
                  help="DuckDB results file [default: $SCALING_DB or ./scaling.duckdb]")
MAX_RUNS = click.option("--max-runs", type=click.IntRange(min=1), default=10_000, show_default=True,
                        help="refuse a sweep that can plan more runs than this (a typo can ask for millions)")
FORCE = click.option("--force", is_flag=True, help="plan however many runs the sweep asks for (no --max-runs cap)")
RUNS_DIR = click.option("--runs-dir", type=click.Path(file_okay=False), default=None,
                        help="where run files go [default: $SCALING_RUNS or ./runs]")


GRID_COLUMNS = ["run_id", "budget", "flops", "params", "active_params", "sparsity", "n_experts", "top_k", "d_model",
                "n_layers", "steps", "tokens", "unique_tokens", "epochs", "seed"]


def runs_root(path: str | None) -> Path:
    return Path(path or os.environ.get("SCALING_RUNS") or "runs").absolute()


def executor_options(command: click.Command) -> click.Command:
    """``--executor`` and one flag per option of the registered backends (``scaling.executors.BACKENDS``); an
    option two backends take is one flag, its help saying what each makes of it."""
    takers: dict[str, list[tuple[str, Option]]] = {}
    for backend in BACKENDS.values():
        for option in backend.options:
            takers.setdefault(option.name, []).append((backend.name, option))
    for name, owners in reversed(takers.items()):
        kind = {str: click.STRING, int: click.INT, float: click.FLOAT}[owners[0][1].kind]
        command = click.option(owners[0][1].flag, name, type=kind, default=None,
                               help="; ".join(f"{backend}: {option.help}" for backend, option in owners))(command)
    return click.option("--executor", type=click.Choice(list(BACKENDS)), default=None,
                        help="where runs train: " + "; ".join(f"{b.name}: {b.summary}" for b in BACKENDS.values())
                        + " [default: the backend the sweep's [executor] table names, else local]")(command)


USER_ERRORS = {"scaling.store": "StoreError", "scaling.laws": "FitError", "scaling.data": "DataError",
               "scaling.executors": "ExecutorError", "duckdb": "Error"}  # module: exception that is the user's input


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input, printed as one line. Only modules already imported can have raised
    one, so none is imported here (``scaling.data`` alone would cost seconds of torch import)."""
    loaded = [getattr(sys.modules[module], name) for module, name in USER_ERRORS.items() if module in sys.modules]
    return (*loaded, FileNotFoundError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="scaling")
def cli() -> None:
    """Scaling-law and isoFLOP studies of dense and Mixture-of-Experts transformers."""


@cli.command()
@click.argument("sweep_file", type=click.Path())
@FORMAT
@click.option("--dropped", is_flag=True, help="print the dropped points instead of the planned runs")
@MAX_RUNS
@FORCE
def grid(sweep_file: str, fmt: str, dropped: bool, max_runs: int, force: bool) -> None:
    """Plan a sweep: every (budget, sparsity, size, seed) run with exact FLOPs and a stable run_id."""
    sweep = load_sweep(sweep_file)  # before the heavy imports: a config error is printed at once
    from scaling.grid import plan, summarize

    planned = plan(capped(sweep, max_runs, force))
    frame = planned.dropped if dropped else planned.runs.drop(columns="spec")
    if fmt == "table" and not dropped:
        frame = frame[GRID_COLUMNS + (["role", "trunk_id", "flops_spent"] if (frame.role != "run").any() else [])]
    emit(frame, fmt, title=f"{len(planned.runs)} planned runs")
    if len(planned.dropped) and not dropped:
        err(f"dropped {len(planned.dropped)} points: {summarize(planned.dropped)} (see --dropped)")


@cli.command()
@click.argument("sweep_file", type=click.Path(), required=False)
@DB
@RUNS_DIR
@click.option("--one", "one", default=None, help="train a single run from a JSON RunSpec (no store)")
@executor_options
@click.option("--retries", type=click.IntRange(min=0), default=1, show_default=True, help="retries of failed runs")
@click.option("--dry-run", is_flag=True, help="print what would run, with FLOPs and estimated time")
@click.option("--quick", is_flag=True, help="a reduced version of the sweep (smoke test)")
@MAX_RUNS
@FORCE
@FORMAT
def run(sweep_file: str | None, db: str | None, runs_dir: str | None, one: str | None, executor: str | None,
        retries: int, dry_run: bool, quick: bool, max_runs: int, force: bool, fmt: str, **options: object) -> None:
    """Train every run of a sweep that is not done yet and ingest the results (resumable).

    Executor options come from the sweep file's [executor] table, overridden by the flags below; each backend
    takes only its own (an option it does not take is an error)."""
    if one is not None:
        run_one(one, runs_dir)
        return
    if sweep_file is None:
        raise click.UsageError("give a SWEEP_FILE, or --one JSON")
    sweep = load_sweep(sweep_file)
    from scaling.sweep import execute_sweep

    if quick:
        from scaling.grid import quick as reduce

        sweep = reduce(sweep)
    sweep = capped(sweep, max_runs, force)
    given = {k: v for k, v in options.items() if v is not None}
    outcome = execute_sweep(sweep, db, runs_root(runs_dir), executor=executor, options=given, retries=retries,
                            dry_run=dry_run, fmt=fmt)
    if outcome is not None and outcome.failed:
        sys.exit(1)  # the summary said which runs failed; finished ones are stored


def capped(sweep: SweepConfig, max_runs: int, force: bool) -> SweepConfig:
    """``sweep``, unless it can plan more runs than ``--max-runs`` and there is no ``--force``: then a
    ConfigError saying how many."""
    from scaling.grid import check_size

    check_size(sweep, None if force else max_runs)
    return sweep


def run_one(spec_json: str, runs_dir: str | None) -> None:
    spec = one_spec(spec_json)
    from scaling.train import train_run

    result = train_run(spec, runs_root(runs_dir) / spec.run_id)
    emit_json(result)


@cli.command("branch-check")
@click.argument("sweep_file", type=click.Path())
@DB
@RUNS_DIR
@FORMAT
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="local worker processes (each gets cores/workers threads)")
def branch_check(sweep_file: str, db: str | None, runs_dir: str | None, fmt: str, workers: int) -> None:
    """Train a wsd-branches sweep both ways, as branches and as dedicated runs (``train.schedule``, cosine by
    default; sweep NAME-dedicated), and compare: final eval loss of branch minus dedicated run per point, with a
    Student-t interval over seeds, and over all pairs. Finished runs are kept: a rerun only compares."""
    from scaling.branches import compare, dedicated_twin, sweep_points
    from scaling.store import connect
    from scaling.sweep import execute_sweep

    sweep = load_sweep(sweep_file)
    if not sweep.schedule.branches:
        raise ConfigError(f'{sweep_file}: branch-check needs a sweep with [schedule] kind = "wsd-branches"')
    twin = dedicated_twin(sweep)
    for each in (sweep, twin):
        execute_sweep(each, db, runs_root(runs_dir), executor="local", options={"workers": workers})
    con = connect(db, read_only=True)
    try:
        table = compare(sweep_points(con, {sweep.name: "branches", twin.name: "dedicated"}))
    finally:
        con.close()
    emit(table, fmt, title=f"final eval loss, branches - dedicated ({sweep.name} against {twin.name})")


def show_progress() -> None:
    """Progress lines of long fits (``scaling.optimize`` logs them) on stderr, never on stdout."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fit: %(message)s"))
    logger = logging.getLogger("scaling.optimize")
    logger.handlers[:] = [handler]  # one handler, on this run's stderr
    logger.setLevel(logging.INFO)
    logger.propagate = False


def one_spec(spec_json: str) -> RunSpec:
    """``--one JSON``: a RunSpec as ``spec.json`` holds it (its ``run_id`` must be the spec's own) that trains at
    least one step; anything else is a ConfigError."""
    try:
        raw = json.loads(spec_json)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--one: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--one: expected a JSON object (a run spec, as in runs/<id>/spec.json), "
                          f"got a {type(raw).__name__}")
    given = raw.pop("run_id", None)
    spec = RunSpec.from_dict(raw)
    if given is not None and given != spec.run_id:
        raise ConfigError(f"--one: run_id {given!r} is not this spec's id ({spec.run_id}): the spec was edited; "
                          "drop run_id")
    batch = spec.train.batch_size * spec.model.context
    if spec.steps < 1:
        raise ConfigError(f"--one: tokens = {spec.tokens} is less than one batch (batch_size × context = {batch} "
                          "tokens): nothing to train")
    return spec


@cli.command()
@click.argument("sweep", required=False)
@DB
@FORMAT
def status(sweep: str | None, db: str | None, fmt: str) -> None:
    """Counts by status, failures with their first error line, slowest runs."""
    from scaling.runner import status_tables
    from scaling.store import connect

    con = connect(db, read_only=True)
    try:
        tables = status_tables(con, sweep_name(sweep))
    finally:
        con.close()
    if fmt == "json":  # one object: {"counts": [...], "failures": [...], "slowest": [...]}
        print(json.dumps({k: json.loads(v.to_json(orient="records", date_format="iso")) for k, v in tables.items()}))
    elif fmt == "csv":  # one CSV: the three tables stacked, told apart by the first column
        import pandas as pd

        frames = [frame.convert_dtypes().assign(table=name) for name, frame in tables.items() if len(frame)]
        stacked = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["table"])
        emit(stacked[["table", *[c for c in stacked.columns if c != "table"]]], "csv")
    else:
        for name, frame in tables.items():
            if len(frame):
                emit(frame, fmt, title=name)
            else:
                click.echo(f"{name}: none")


def sweep_name(sweep: str | None) -> str | None:
    """A sweep is named by its file or its name."""
    if sweep and (sweep.endswith(".toml") or Path(sweep).is_file()):
        return load_sweep(sweep).name
    return sweep


def assignments(pairs: tuple[str, ...], option: str, metavar: str) -> dict[str, str]:
    """``("loss=val_loss", ...)`` -> ``{"loss": "val_loss", ...}``; anything else is a usage error."""
    bad = [p for p in pairs if p.count("=") != 1 or not all(p.split("="))]
    if bad:
        raise click.BadParameter(f"expected {metavar}, got {', '.join(map(repr, bad))}", param_hint=option)
    return dict(p.split("=") for p in pairs)


class LawChoice(click.Choice):
    """``--law``: the names in ``scaling.laws.LAWS``, read when the command runs (a law registered by then is a
    choice), and approach1 (``scaling.approach1``, fitted to training curves)."""

    def __init__(self) -> None:  # no fixed list: ``choices`` reads the registry
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        from scaling.laws import LAWS

        return (*LAWS, "approach1")


def law_options(law: str, pairs: tuple[str, ...], weighted: bool = False) -> dict:
    """The law's constructor options from the command line: ``--freeze NAME=VALUE`` (``Law.freeze_options``)
    and ``--weighted``; an option the law does not take is a usage error."""
    from scaling.laws import LAWS, FitError

    values = {}
    for name, value in assignments(pairs, "--freeze", "NAME=VALUE").items():
        try:
            values[name] = float(value)
        except ValueError:
            raise click.BadParameter(f"expected NAME=VALUE with a number, got {name}={value}",
                                     param_hint="--freeze") from None
    try:
        options = LAWS[law].freeze_options(values)
    except FitError as e:
        raise click.BadParameter(str(e), param_hint="--freeze") from None
    if weighted:
        if "weighted" not in inspect.signature(LAWS[law]).parameters:
            raise click.BadParameter(f"the {law} law has no weighted fit", param_hint="--weighted")
        options["weighted"] = True
    return options


@cli.command()
@click.argument("sweep", required=False)
@click.option("--law", type=LawChoice(), required=True,
              help="approach1 (Chinchilla's first method) fits training curves: the sweep's stored curves, or a "
                   "--csv of curve points (run_id, params, tokens, loss[, flops]); sparsity-vertex: the optimal "
                   "sparsity under plenty and scarce data from isoFLOP vertices (needs runs at 2+ unique-token "
                   "limits)")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="fit an external CSV (columns params, active_params, tokens, unique_tokens, sparsity, flops, loss)")
@click.option("--column", "columns", multiple=True, metavar="OURS=THEIRS",
              help="with --csv: read convention column OURS from the CSV's column THEIRS (repeatable), "
                   "e.g. --column loss=val_loss")
@click.option("--where", default=None, metavar="SQL",
              help="fit only the rows matching this SQL condition (on the CSV's own columns, or on the store's "
                   "isoflop_points view)")
@click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="fit only the runs at this sparsity S (a law that does not model sparsity fits one S at a time)")
@click.option("--freeze", "freeze", multiple=True, metavar="NAME=VALUE",
              help="hold a parameter at a value (repeatable), e.g. --freeze alpha=0.35 (chinchilla, "
                   "data-constrained, sparsity) or --freeze L_inf=1.8 (envelope)")
@click.option("--weighted", is_flag=True,
              help="isoflop: fit N*(C) and D*(C) by WLS, weighting each vertex by its precision [default: OLS]")
@click.option("--bootstrap", type=int, default=0, show_default=True, help="bootstrap resamples over runs")
@click.option("--budget", type=float, default=None, help="FLOP budget C for the compute-optimal answer")
@click.option("--unique-tokens", type=float, default=None, help="unique-token limit U for the answer")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--holdout-largest", "holdout", type=click.IntRange(min=1), default=None, metavar="K",
              help="extrapolation check: fit on all but the K largest budgets and predict those runs (not saved)")
@DB
@FORMAT
def fit(sweep: str | None, law: str, csv_path: str | None, columns: tuple[str, ...], where: str | None,
        sparsity: float | None, freeze: tuple[str, ...], weighted: bool, bootstrap: int, budget: float | None,
        unique_tokens: float | None, seed: int, holdout: int | None, db: str | None, fmt: str) -> None:
    """Fit a scaling law to a sweep's runs (saved in the store) or to a CSV."""
    if law == "approach1":
        fit_approach1(sweep, csv_path, columns, where, sparsity, bootstrap, budget, seed, db, fmt)
        return
    if holdout is not None:
        fit_holdout(sweep, law, csv_path, columns, where, sparsity, law_options(law, freeze, weighted), bootstrap,
                    budget, unique_tokens, seed, holdout, db, fmt)
        return

    if columns and not csv_path:
        raise click.UsageError("--column applies to --csv only")
    if sparsity is not None and not math.isfinite(sparsity):  # FloatRange lets NaN through
        raise click.BadParameter(f"{sparsity} is not a sparsity in [0, 1)", param_hint="--sparsity")
    options = dict(where=where, sparsity=sparsity, bootstrap=bootstrap, budget=budget, unique_tokens=unique_tokens,
                   seed=seed, **law_options(law, freeze, weighted))
    if not csv_path and not sweep:
        raise click.UsageError("give a SWEEP (from the store) or --csv PATH")
    show_progress()
    from scaling.fitting import fit_frame, fit_sweep
    from scaling.laws import result_rows

    if csv_path:
        result = fit_frame(csv_path, law, columns=assignments(columns, "--column", "OURS=THEIRS"), **options)
    else:
        result = fit_sweep(db, sweep_name(sweep), law, **options)
    if fmt == "json":
        emit_json(result)
    else:
        emit(result_rows(result), fmt, title=f"{law} fit ({result['n_points']} points)")
        for note in result.get("notes", []):
            err(f"note: {note}")


@cli.command()
@click.option("--fit", "fit_id", required=True, help="a saved fit (SELECT fit_id FROM fits)")
@click.option("--params", "n", type=click.FloatRange(min=0, min_open=True), default=None, help="total params N")
@click.option("--tokens", "d", type=click.FloatRange(min=0, min_open=True), default=None, help="training tokens D")
@click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True), default=None, help="sparsity S [default: 0]")
@click.option("--unique-tokens", "u", type=click.FloatRange(min=0, min_open=True), default=None,
              help="unique tokens U [default: D, nothing repeated]")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="predict every row of a CSV with columns params, tokens (optionally sparsity, unique_tokens)")
@click.option("--bootstrap", type=click.IntRange(min=0), default=200, show_default=True,
              help="resamples over the fit's runs for the intervals")
@click.option("--seed", type=int, default=0, show_default=True)
@DB
@FORMAT
def predict(fit_id: str, n: float | None, d: float | None, sparsity: float | None, u: float | None,
            csv_path: str | None, bootstrap: int, seed: int, db: str | None, fmt: str) -> None:
    """Predicted loss of a saved fit at new points, with confidence and prediction intervals."""
    import pandas as pd

    from scaling.predict import POINT_COLUMNS
    from scaling.predict import predict as predict_points

    if csv_path and (n or d):
        raise click.UsageError("give --params and --tokens, or --csv, not both")
    if csv_path:
        from scaling.fitting import read_points

        points = read_points(csv_path)
        missing = [c for c in ("params", "tokens") if c not in points]
        if missing:
            raise click.BadParameter(f"{csv_path} has no column {', '.join(missing)}", param_hint="--csv")
        points = points[[c for c in POINT_COLUMNS if c in points]]
    elif n and d:
        points = pd.DataFrame({"params": [n], "tokens": [d], "sparsity": [sparsity], "unique_tokens": [u]})
    else:
        raise click.UsageError("give --params N and --tokens D (or --csv FILE)")
    table, notes = predict_points(db, fit_id, points, bootstrap=bootstrap, seed=seed)
    emit(table, fmt, title=f"predictions of {fit_id}")
    for note in notes:
        err(f"note: {note}")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--sweep", "sweep", required=True, help="name of the external sweep the runs go into")
@click.option("--column", "columns", multiple=True, metavar="OURS=THEIRS",
              help="read convention column OURS from the file's column THEIRS (repeatable), as for fit --csv")
@click.option("--key", default=None, metavar="COLUMN",
              help="the file's column naming each run [default: a hash of the row's config columns]")
@click.option("--curves", type=click.Path(dir_okay=False), default=None,
              help="long-format training curves: run (a --key value), step and/or tokens, loss, optionally lr")
@click.option("--curve-column", "curve_columns", multiple=True, metavar="OURS=THEIRS",
              help="read curve column OURS (run, step, tokens, loss, eval_loss, train_loss, lr, wall_s) from "
                   "THEIRS (repeatable)")
@DB
@FORMAT
def ingest(file: str, sweep: str, columns: tuple[str, ...], key: str | None, curves: str | None,
           curve_columns: tuple[str, ...], db: str | None, fmt: str) -> None:
    """Store runs trained elsewhere (CSV, Parquet, JSON Lines) as an external sweep; rerun after the file
    changes."""
    from scaling.ingest import ingest_file

    done = ingest_file(db, file, sweep, columns=assignments(columns, "--column", "OURS=THEIRS"), key=key,
                       curves=curves, curve_columns=assignments(curve_columns, "--curve-column", "OURS=THEIRS"))
    emit(done.table(), fmt, title=f"sweep {sweep}")
    for note in done.notes:
        err(f"note: {note}")


def fit_approach1(sweep: str | None, csv_path: str | None, columns: tuple[str, ...], where: str | None,
                  sparsity: float | None, bootstrap: int, budget: float | None, seed: int, db: str | None,
                  fmt: str) -> None:
    """``fit --law approach1``: the lower envelope of the training curves and N*(C) ∝ C^a."""
    import pandas as pd

    from scaling.approach1 import fit_curves, fit_sweep_curves
    from scaling.fitting import convention_columns, read_points
    from scaling.laws import result_rows

    options = dict(bootstrap=bootstrap, budget=budget, seed=seed)
    if csv_path:
        frame = convention_columns(read_points(csv_path, where), assignments(columns, "--column", "OURS=THEIRS"),
                                   csv_path)
        if sparsity is not None and "sparsity" in frame:
            frame = frame[(frame["sparsity"] - sparsity).abs() < 1e-6]
        result = fit_curves(frame, csv_path, x="active_params" if "active_params" in frame else "params", **options)
    elif sweep:
        result = fit_sweep_curves(db, sweep_name(sweep), where, sparsity, **options)
    else:
        raise click.UsageError("give a SWEEP (from the store) or --csv PATH")
    if fmt == "json":
        emit_json(result)
        return
    if fmt == "table":
        emit(result_rows(result), fmt, title=f"approach 1 ({result['n_points']} curve points)")
    env = pd.DataFrame(result["envelope"])
    if fmt == "table":  # one row per stretch of budgets with the same best run
        env = env[env["run_id"] != env["run_id"].shift()]
    emit(env, fmt, title="lower envelope of the curves")
    for note in result.get("notes", []):
        err(f"note: {note}")


def fit_holdout(sweep: str | None, law: str, csv_path: str | None, columns: tuple[str, ...], where: str | None,
                sparsity: float | None, options: dict[str, Any], bootstrap: int, budget: float | None,
                unique_tokens: float | None, seed: int, k: int, db: str | None, fmt: str) -> None:
    """``fit --holdout-largest K``: the fit on the smaller budgets, then the held-out runs (csv: those only)."""
    import pandas as pd

    from scaling.fitting import csv_points, one_sparsity, sweep_points
    from scaling.holdout import holdout_fit
    from scaling.laws import result_rows

    if csv_path:
        frame = csv_points(csv_path, law, assignments(columns, "--column", "OURS=THEIRS"), where, sparsity)
    elif sweep:
        frame = one_sparsity(sweep_points(db, sweep_name(sweep), where, sparsity), law, f"sweep {sweep!r}")
    else:
        raise click.UsageError("give a SWEEP (from the store) or --csv PATH")
    result = holdout_fit(frame, law, k, bootstrap=bootstrap, seed=seed, budget=budget, unique_tokens=unique_tokens,
                         **options)
    runs = pd.DataFrame(result["holdout"]["runs"])
    if fmt == "json":
        emit_json(result)
        return
    if fmt == "table":
        emit(result_rows(result), fmt, title=f"{law} fit on the smaller budgets ({result['n_points']} points)")
    emit(runs, fmt, title=f"held-out runs at the {k} largest budget(s)")
    for note in result.get("notes", []):
        err(f"note: {note}")


@cli.command()
@click.argument("sweep")
@DB
@click.option("--out", type=click.Path(file_okay=False), default=None, help="[default: reports/SWEEP]")
@click.option("--bootstrap", type=int, default=200, show_default=True)
def report(sweep: str, db: str | None, out: str | None, bootstrap: int) -> None:
    """Figures and a self-contained HTML report of a sweep."""
    from scaling.report import write_report

    name = sweep_name(sweep)
    path = write_report(db, name, Path(out or f"reports/{name}"), bootstrap=bootstrap)
    click.echo(f"report: {path}")


@cli.command()
@click.argument("query", required=False)
@DB
@click.option("--format", "fmt", type=click.Choice([*FORMATS, "parquet"]), default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write to a file (needed for parquet)")
@click.option("--schema", "show_schema", is_flag=True, help="print tables, views and their columns")
def sql(query: str | None, db: str | None, fmt: str, out: str | None, show_schema: bool) -> None:
    """Run read-only SQL over the results (views: final_losses, isoflop_points, training_curves, ...)."""
    from scaling.sqlquery import run_query

    run_query(db, query, fmt=fmt, out=out, show_schema=show_schema)


@cli.command()
@click.argument("sweep")
@click.option("--to", "to", type=click.Path(file_okay=False), required=True)
@DB
def export(sweep: str, to: str, db: str | None) -> None:
    """Write every table of the store as Parquet files (for any other engine)."""
    from scaling.sqlquery import export_parquet

    for path in export_parquet(db, sweep_name(sweep), Path(to)):
        click.echo(path)


@cli.command()
@click.argument("sweep")
@click.option("--runs", "run_ids", multiple=True, help="run ids to compare (default: all ok runs)")
@click.option("--match", type=click.Choice(["tokens", "loss"]), default="tokens", show_default=True)
@click.option("--bootstrap", type=int, default=200, show_default=True, help="resamples over eval tokens")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="[default: reports/SWEEP]")
@DB
@FORMAT
def similarity(sweep: str, run_ids: tuple[str, ...], match: str, bootstrap: int, out: str | None,
               db: str | None, fmt: str) -> None:
    """Per-token loss r² between runs over training (do MoE and dense learn the same things?)."""
    from scaling.similarity import similarity_command

    similarity_command(db, sweep_name(sweep), list(run_ids), match, bootstrap,
                       Path(out or f"reports/{sweep_name(sweep)}"), fmt)


@cli.command()
@DB
@RUNS_DIR
@click.option("--out", type=click.Path(file_okay=False), default=None, help="[default: reports/demo]")
@click.option("--quick", is_flag=True, help="a reduced version (< 2 minutes) for smoke tests")
@click.option("--workers", type=int, default=os.cpu_count() or 1, show_default="all cores",
              help="local worker processes, one thread each (the demo's models are small)")
def demo(db: str | None, runs_dir: str | None, out: str | None, quick: bool, workers: int) -> None:
    """The main job: compute-optimal sparsity under finite data, end to end (train, fit, report)."""
    from scaling.demo import run_demo

    run_demo(db, runs_root(runs_dir), Path(out) if out else None, quick=quick, workers=workers)


@cli.group()
def data() -> None:
    """Corpora: fetch and tokenize once into a cache."""


@data.command("prepare")
@click.argument("name", default="shakespeare")
@click.option("--tokenizer", type=click.Choice(["byte", "bpe"]), default="byte", show_default=True)
@click.option("--vocab-size", type=int, default=256, show_default=True)
def data_prepare(name: str, tokenizer: str, vocab_size: int) -> None:
    """Prepare a corpus: shakespeare, bible, a text file or folder, or a .bin/.npy of token ids."""
    from scaling.data import prepare

    click.echo(prepare(name, tokenizer=tokenizer, vocab_size=vocab_size))


def main() -> None:
    """Entry point: user errors are one line on stderr (exit 2 for configuration, 1 otherwise)."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ConfigError as e:
        err(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(130)
    except Exception as e:
        if isinstance(e, user_errors()) and not os.environ.get("SCALING_DEBUG"):
            err(f"error: {one_line(e)}")
            sys.exit(1)
        traceback.print_exc()
        sys.exit(1)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
