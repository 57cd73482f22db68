"""``scaling report``: fit every law to a sweep, draw every figure, write one self-contained HTML page.

Under ``out``: ``figures/<name>.png`` and ``.svg``, ``index.html`` (PNGs embedded as data URIs: it opens from disk
with no server) and ``answer.json`` (the compute-optimal sentence and its numbers). The fits are saved in the store
(``fits`` / ``fit_values``). A law that cannot be fitted is reported with its reason; the rest still runs.
Every table on the page shows the SQL that reproduces it from the store.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
from plotnine import element_text, labs, theme

from scaling import plots
from scaling.bootstrap import percentile_intervals
from scaling.branches import savings_note
from scaling.holdout import holdout_fit
from scaling.laws import LAWS, FitError, Law, result_rows, summarize
from scaling.predict import parametric
from scaling.sparsity_vertex import law_checks
from scaling.store import StoreError, connect, db_path, literal, runs_frame, save_fit

RUNS_SQL = """SELECT s.budget, r.run_id, r.status, r.sparsity, r.n_experts, r.top_k, r.params, r.active_params,
       r.tokens, r.epochs, r.seed, r.final_eval_loss
FROM runs r JOIN sweep_runs s USING (run_id)
WHERE s.sweep = {sweep}
ORDER BY s.budget, r.sparsity, r.active_params, r.seed"""
SETTINGS_SQL = "SELECT key, value FROM json_each((SELECT config FROM sweeps WHERE name = {sweep}))"
POINTS_SQL = """SELECT p.*, r.n_experts, r.top_k FROM isoflop_points p JOIN runs r USING (run_id)
WHERE p.sweep = {sweep} AND p.loss IS NOT NULL ORDER BY p.budget, p.sparsity, p.active_params"""
FINALS_SQL = "SELECT * FROM final_losses WHERE sweep = {sweep}"
CURVES_SQL = "SELECT * FROM training_curves WHERE sweep = {sweep} AND eval_loss IS NOT NULL ORDER BY run_id, step"
ROUTER_SQL = """SELECT s.budget, r.sparsity, r.n_experts, r.top_k, r.active_params, x.*
FROM router_stats x JOIN runs r USING (run_id) JOIN sweep_runs s USING (run_id)
WHERE s.sweep = {sweep} AND r.status = 'ok'"""
SELECTION_SQL = "SELECT * FROM isoflop_points WHERE sweep = {sweep} AND loss IS NOT NULL"
FIT_SQL = "SELECT parameter, value, ci_lo, ci_hi FROM fit_params WHERE fit_id = {fit_id} ORDER BY parameter"
HOLDOUT_BOOTSTRAP = 50  # resamples for the extrapolation check's prediction intervals (at most the report's)
RUN_COLUMNS = {"budget": "budget C", "run_id": "run", "status": "status", "sparsity": "S", "n_experts": "E",
               "top_k": "k", "params": "params", "active_params": "active params", "tokens": "tokens D",
               "epochs": "epochs", "seed": "seed", "final_eval_loss": "final eval loss"}


@dataclass
class Fit:
    """One fitted law (or why it could not be fitted), the fitted model for predictions and the stored fit id."""

    law: str
    title: str
    selection: str
    sparsity: float | None = None
    result: dict[str, Any] | None = None
    model: Law | None = None
    error: str | None = None
    fit_id: str | None = None
    stored: pd.DataFrame | None = None
    frame: pd.DataFrame | None = None
    holdout: dict[str, Any] | str | None = None  # the extrapolation check (``scaling.holdout``), or why not
    checks: list[str] = field(default_factory=list)

    @property
    def table(self) -> pd.DataFrame:
        """Parameters and numeric optimum values with intervals, as ``fit_params`` stores them (by name)."""
        rows = result_rows(self.result or {}, by_name=True).rename(columns={"name": "parameter"})
        return rows[["parameter", "value", "ci_lo", "ci_hi"]].sort_values("parameter")


@dataclass
class Figure:
    """One figure: its files, or why it was not drawn."""

    name: str
    caption: str
    paths: list[Path] = field(default_factory=list)
    missing: str | None = None


@dataclass(frozen=True)
class ExtraFigure:
    """A figure added from outside this module (``FIGURES``): ``make(data, fits)`` returns a plot, or None when
    the sweep has nothing to draw, which the report then says with ``reason``."""

    caption: str
    make: Callable[[SweepData, list[Fit]], Any]
    reason: str


FIGURES: dict[str, ExtraFigure] = {}  # name → a figure drawn after the built-in ones: one line adds one


@dataclass
class SweepData:
    """Everything the report reads from the store (read-only)."""

    config: dict[str, Any]
    settings: pd.DataFrame
    runs: pd.DataFrame
    run_table: pd.DataFrame
    points: pd.DataFrame
    finals: pd.DataFrame
    curves: pd.DataFrame
    router: pd.DataFrame
    similarity: pd.DataFrame | None
    similarity_note: str


def sql(template: str, sweep: str) -> str:
    return template.format(sweep=literal(sweep))


def read_sweep(db: str | None, sweep: str, bootstrap: int) -> SweepData:
    """Read a sweep's settings, runs, points, curves, router statistics and per-token similarity."""
    con = connect(db, read_only=True)
    try:
        row = next(iter(con.execute("SELECT config FROM sweeps WHERE name = ?", [sweep]).fetchall()), None)
        if row is None:
            names = ", ".join(n for (n,) in con.execute("SELECT name FROM sweeps ORDER BY name").fetchall())
            raise StoreError(f"no sweep named {sweep!r} in {db_path(db)} (sweeps: {names or 'none'})")
        query = lambda template: con.execute(sql(template, sweep)).df()  # noqa: E731
        similarity, similarity_note = similarity_frame(con, sweep, bootstrap)
        return SweepData(config=json.loads(row[0]), settings=query(SETTINGS_SQL), runs=runs_frame(con, sweep),
                         run_table=query(RUNS_SQL),
                         points=query(POINTS_SQL), finals=query(FINALS_SQL), curves=query(CURVES_SQL),
                         router=query(ROUTER_SQL), similarity=similarity, similarity_note=similarity_note)
    finally:
        con.close()


def similarity_frame(con: duckdb.DuckDBPyConnection, sweep: str,
                     bootstrap: int) -> tuple[pd.DataFrame | None, str]:
    """Per-token loss r² over training (``scaling.similarity``) for the user's question: MoE against dense, beside
    seed against seed. At the budget with the most seeds (then the largest), the dense and the sparsest variant
    each at the size with the most seeds (then the middle one); checkpoints matched by eval loss ("trained to the
    same loss"). Returns the mean r² per pair kind and what was compared, or None and why there is nothing."""
    from scaling.similarity import kind_means, load_arrays, similarity_table

    try:
        arrays = load_arrays(con, sweep)
    except StoreError as e:
        return None, str(e)
    runs = runs_frame(con, sweep)
    runs = runs[runs["run_id"].isin(arrays["run_id"]) & (runs["status"] == "ok")]
    if runs["run_id"].nunique() < 2:
        return None, "fewer than two runs stored per-token losses"
    seeds = runs.groupby("budget")["seed"].nunique()
    budget = max(seeds.index, key=lambda b: (seeds[b], b))
    picks = []
    for sparsity in sorted({runs["sparsity"].min(), runs["sparsity"].max()}):
        group = runs[(runs["budget"] == budget) & (runs["sparsity"] == sparsity)]
        counts = group.groupby("active_params")["seed"].nunique()
        middle = np.median(np.log(counts.index.to_numpy(float)))
        size = max(counts.index, key=lambda n: (counts[n], -abs(math.log(n) - middle)))
        picks.append(group[group["active_params"] == size])
    table = similarity_table(arrays, pd.concat(picks), "loss", n_boot=min(bootstrap, 100))
    if table.empty:
        return None, "no pair of runs to compare"
    return kind_means(table), (f"runs at C = {plots.sci(budget)}, one size per variant; each checkpoint of run A "
                               "against run B's checkpoint of nearest eval loss, x: A's tokens")


def plenty_points(points: pd.DataFrame) -> tuple[pd.DataFrame, str, str]:
    """The runs at the sweep's largest unique-token limit (all runs when it has one), the SQL condition selecting
    them and a title suffix: the one-U analyses (isoFLOP frontier, envelope) of a sweep that sweeps U."""
    if points["unique_tokens"].nunique() < 2:
        return points, "", ""
    plenty = points["unique_tokens"].max()
    return (points[points["unique_tokens"] == plenty], f" AND unique_tokens = {plenty:.0f}",
            f", U = {plots.sci(plenty)} (plenty)")


def fit_all(data: SweepData, bootstrap: int, budget: float, unique_tokens: float) -> list[Fit]:
    """Every law of ``LAWS`` the sweep supports (``Law.reported``), each with its optimum at ``budget``: a law
    of one sparsity per sparsity level (``report_runs = "dense"``: on the dense runs only), a law of sparsity on
    all runs; a law that does not model the unique-token limit on the plenty runs of a sweep of several (the
    others on all runs); then the sparsity law cross-checked against the isoFLOP vertices."""
    points = data.points
    fits = []
    for name, law in LAWS.items():
        if law.report_runs is None or not law.reported(points):
            continue
        limit = unique_tokens if "U" in law.limits else None
        if law.report_runs == "dense":
            fits.append(run_fit(Fit(name, f"{law.title}, dense runs", f"{SELECTION_SQL} AND sparsity = 0"),
                                points[points["sparsity"] == 0], bootstrap, budget, limit))
            continue
        frame, where, suffix = (points, "", "") if law.uses_unique_tokens else plenty_points(points)
        if law.uses_sparsity:
            fits.append(run_fit(Fit(name, f"{law.title}{suffix}", SELECTION_SQL + where), frame, bootstrap, budget,
                                limit))
            continue
        for sparsity in sorted(frame["sparsity"].unique()):
            fit = Fit(name, f"{law.title}, {plots.variant_label(sparsity)}{suffix}",
                      f"{SELECTION_SQL} AND sparsity = {sparsity:g}{where}", sparsity=sparsity)
            fits.append(run_fit(fit, frame[frame["sparsity"] == sparsity], bootstrap, budget, limit))
    cross_check(named(fits, "sparsity"), named(fits, "sparsity-vertex"), points)
    return fits


def cross_check(law: Fit | None, vertex: Fit | None, points: pd.DataFrame) -> None:
    """The parametric law's contradictions of the runs and of the vertices' S*, added to its notes."""
    if law is None or vertex is None or law.model is None or vertex.model is None:
        return
    try:
        law.checks = law_checks(law.model, vertex.model, points)
    except Exception as e:  # the check must not cost the report
        law.checks = [f"cross-check with the isoFLOP vertices failed: {type(e).__name__}: {e}"]
    law.result["notes"] += law.checks


def run_fit(fit: Fit, frame: pd.DataFrame, bootstrap: int, budget: float, unique_tokens: float | None = None,
            **options: Any) -> Fit:
    """Fit one law (``scaling.laws.LAWS``) with ``bootstrap`` resamples over runs; a failure is recorded on the
    fit, never raised."""
    fit.frame = frame
    try:
        if frame.empty:
            raise FitError("no finished runs to fit")
        fit.model = LAWS[fit.law](bootstrap=bootstrap, seed=0, **options).fit(frame)
        fit.result = summarize(fit.model, fit.law, budget, unique_tokens)
    except FitError as e:
        fit.error = str(e)
    except Exception as e:  # a bug in one law must not cost the whole report: it is shown on the page instead
        fit.error = f"unexpected {type(e).__name__}: {e}"
        warnings.warn(f"{fit.title}: {fit.error}", stacklevel=2)
    return fit


def save_fits(db: str | None, sweep: str, fits: list[Fit]) -> str | None:
    """Store the successful fits (one write connection, opened only now); returns why not, if they could not be."""
    done = [f for f in fits if f.result is not None]
    if not done:
        return None
    try:
        con = connect(db)
    except StoreError as e:
        return str(e)
    try:
        for fit in done:
            fit.fit_id = save_fit(con, sweep, fit.result, selection=sql(fit.selection, sweep))
            fit.stored = con.execute(FIT_SQL.format(fit_id=literal(fit.fit_id))).df()
    finally:
        con.close()
    return None


# ---------------------------------------------------------------------------------------------- frames for figures


def vertices(fits: list[Fit], points: pd.DataFrame) -> pd.DataFrame | None:
    """The isoFLOP vertices of every sparsity, with n_experts and top_k for the labels."""
    frames = []
    for fit in fits:
        if fit.law == "isoflop" and fit.model is not None and len(fit.model.vertices_):
            frames.append(fit.model.vertices_.assign(sparsity=fit.sparsity))
    if not frames:
        return None
    experts = points.drop_duplicates("sparsity")[["sparsity", "n_experts", "top_k"]]
    return pd.concat(frames, ignore_index=True).merge(experts, on="sparsity", how="left")


def exponents(fits: list[Fit]) -> pd.DataFrame:
    """The frontier exponents a (N* ∝ C^a) and b (D* ∝ C^b) with intervals, per sparsity."""
    rows = []
    for fit in fits:
        if fit.law == "isoflop" and fit.result is not None:
            for name in ("a", "b"):
                if name in fit.result["params"]:
                    lo, hi = (fit.result.get("ci", {}).get(name) or [None, None])[:2]
                    rows.append({"sparsity": fit.sparsity, "name": name, "value": fit.result["params"][name],
                                 "ci_lo": lo, "ci_hi": hi})
    return pd.DataFrame(rows, columns=["sparsity", "name", "value", "ci_lo", "ci_hi"])


def sparsity_frames(fit: Fit | None, points: pd.DataFrame, unique_tokens: float,
                    level: float = 0.95) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The sparsity law's lowest loss per budget along S (over N, with C = 6ND: ``Sparsity.optimum`` at fixed S)
    and its S* per budget with the bootstrap interval."""
    if fit is None or fit.model is None:
        return None, None
    model = fit.model
    grid = np.linspace(0, points["sparsity"].max(), 36)
    rows, optima = [], []
    for c in sorted(points["budget"].unique()):
        rows += [{"budget": c, "sparsity": s, "loss": model.optimum(c, U=unique_tokens, sparsities=[s])["loss"]}
                 for s in grid]
        best = model.optimum(c, U=unique_tokens)
        lo = hi = np.nan
        if model.bootstrap_ is not None:
            draws = [model.optimum(c, U=unique_tokens, params=row)["S_star"]
                     for row in model.bootstrap_.to_dict("records")]
            lo, hi = percentile_intervals(pd.DataFrame({"S": draws}), level).get("S", (np.nan, np.nan))
        optima.append({"budget": c, "S_star": best["S_star"], "loss": best["loss"], "S_lo": lo, "S_hi": hi})
    return pd.DataFrame(rows), pd.DataFrame(optima)


def repetition_frame(fit: Fit | None, points: pd.DataFrame, unique_tokens: float) -> pd.DataFrame | None:
    """The data-constrained law's loss against epochs for each dense model size of the sweep."""
    if fit is None or fit.model is None:
        return None
    dense = points[points["sparsity"] == 0]
    epochs = np.geomspace(points["epochs"].min(), points["epochs"].max() * 2, 60)
    frames = []
    for (active, params), _ in dense.groupby(["active_params", "params"]):
        frame = pd.DataFrame({"active_params": active, "params": params, "tokens": epochs * unique_tokens,
                              "unique_tokens": unique_tokens, "sparsity": 0.0, "epochs": epochs,
                              "flops": 6 * active * epochs * unique_tokens})
        frames.append(frame.assign(loss=fit.model.predict(frame), kind="data-constrained law"))
    return pd.concat(frames, ignore_index=True) if frames else None


def r_d_star(fit: Fit | None) -> float | None:
    """The data-constrained fit's R_D*, if it was fitted."""
    return None if fit is None or fit.model is None else fit.model.params_.get("R_D_star")


def check_extrapolation(fits: list[Fit], bootstrap: int) -> None:
    """Each fitted parametric law refitted without its largest budget, predicting those runs (``fit.holdout``)."""
    for fit in fits:
        if fit.model is None or not parametric(fit.law):
            continue
        try:
            fit.holdout = holdout_fit(fit.frame, fit.law, 1, bootstrap=min(bootstrap, HOLDOUT_BOOTSTRAP))
        except FitError as e:
            fit.holdout = str(e)
        except Exception as e:  # like run_fit: one failing check must not cost the report
            fit.holdout = f"unexpected {type(e).__name__}: {e}"


def holdout_specs(fits: list[Fit]) -> list[tuple[str, str, Callable[[], Any], str]]:
    """One extrapolation figure per parametric law that was checked."""
    specs = []
    for fit in fits:
        if fit.holdout is None:
            continue
        check = fit.holdout if isinstance(fit.holdout, dict) else {}
        summary = check.get("holdout", {}).get("summary", {})
        text = (f"mean error {summary['mean_abs_error']:.3g} nats (max {summary['max_abs_error']:.3g}), "
                f"{summary['mean_error_fraction']:.0%} of the loss above the law's floor; "
                f"{summary['level']:.0%} prediction intervals cover {summary['coverage']:.0%}") if summary else ""
        runs = pd.DataFrame(check.get("holdout", {}).get("runs", []))
        specs.append((f"holdout_{fit.law}", f"Extrapolation check, {fit.title}: fitted without the largest budget, "
                      f"predicted against observed loss of its runs with prediction intervals; {text}.",
                      lambda runs=runs, law=fit.law: plots.holdout_plot(runs if len(runs) else None,
                                                                        f"{law}: the largest budget predicted"),
                      fit.holdout if isinstance(fit.holdout, str) else "no held-out runs"))
    return specs


def named(fits: list[Fit], law: str) -> Fit | None:
    return next((f for f in fits if f.law == law), None)


def fitted(fit: Fit | None) -> bool:
    return fit is not None and fit.model is not None


def failures(fits: list[Fit], law: str) -> list[str]:
    """'<title>: <why>' for every fit of ``law`` that failed."""
    return [f"{fit.title}: {fit.error}" for fit in fits if fit.law == law and fit.error]


def noted(plot: Any, notes: list[str]) -> Any:
    """``plot`` with a note under it saying which fits failed (so the data are drawn without them)."""
    if plot is None or not notes:
        return plot
    text = "\n".join(textwrap.fill(f"fit failed, not drawn: {note}", 110) for note in notes[:3])
    return plot + labs(caption=text) + theme(plot_caption=element_text(size=7, ha="left", color="#a33"))


def draw(data: SweepData, fits: list[Fit], unique_tokens: float, folder: Path) -> list[Figure]:
    """Every figure as PNG and SVG under ``folder``; a figure without data says why. With 2+ unique-token limits
    the one-U figures show the plenty runs and two figures compare the regimes."""
    points, _, suffix = plenty_points(data.points)
    verts = vertices(fits, points)
    vertex = named(fits, "sparsity-vertex")
    vertex_model = None if vertex is None else vertex.model
    regimes = vertex.error if vertex is not None and vertex.error else "no plenty vs scarce comparison"
    envelope = named(fits, "envelope")
    envelope_fit = None if envelope is None or envelope.result is None else envelope.table.rename(
        columns={"parameter": "name"})
    moe = "no MoE runs with router statistics"
    isoflop_failed = failures(fits, "isoflop")
    sparsity_law, repetition_law = named(fits, "sparsity"), named(fits, "data-constrained")
    profiles = ("; parabolas in log N per budget with 3+ sizes, their vertices marked"
                + (" with the isoFLOP fit's interval (crosses: outside the sampled sizes)" if verts is not None
                   else " (no interval: the isoFLOP fits failed)"))
    compare: list[tuple[str, str, Callable[[], Any], str]] = [
        ("regimes_isoflop", "IsoFLOP curves per sparsity at the largest budget under plenty and scarce unique "
         "tokens: each line is the parabola fitted to the sizes nearest that curve's minimum (drawn over those "
         "sizes), vertices (diamonds) with 95% bootstrap intervals in N* and L*; arrows run from each sparsity's "
         "plenty vertex (hollow circle) to its scarce vertex.",
         lambda: plots.regime_isoflop_plot(data.points, getattr(vertex_model, "vertices_", None)), regimes),
        ("regimes_sparsity", "IsoFLOP vertex loss L* against sparsity per budget, plenty and scarce data side by "
         "side (bars: 95% bootstrap intervals); stars: the optimal sparsity S* (parabola in log E through the lowest "
         "three) with its interval.",
         lambda: plots.vertex_sparsity_plot(getattr(vertex_model, "vertices_", None),
                                            getattr(vertex_model, "s_star_", None)), regimes),
    ]
    specs: list[tuple[str, str, Callable[[], Any], str]] = [*(compare if vertex is not None else []),
        ("isoflop_params", f"IsoFLOP profiles: final loss against active parameters per budget{suffix}{profiles}.",
         lambda: noted(plots.isoflop_plot(points, verts), isoflop_failed), "no finished runs"),
        ("isoflop_tokens", "The same profiles against training tokens D = C/(6N).",
         lambda: noted(plots.isoflop_plot(points, verts, x="tokens"), isoflop_failed), "no finished runs"),
        ("frontier", "Compute-optimal N*(C) and D*(C): isoFLOP vertices with power-law lines (bands: lines refitted "
         "to vertices redrawn within their intervals) and the fitted exponents with bootstrap intervals.",
         lambda: plots.frontier_plot(verts, exponents(fits)), "no isoFLOP vertices (isoFLOP fits failed)"),
        ("sparsity", "Best loss per budget against sparsity" + (
            "; lines: the sparsity-aware law at the compute-optimal size for each S (C = 6ND); stars: its optimum "
            "S* per budget with the 95% bootstrap interval." if fitted(sparsity_law) else
            " (dotted: joining the runs; the sparsity-aware law was not fitted)."),
         lambda: noted(plots.sparsity_plot(points, *sparsity_frames(sparsity_law, points, unique_tokens)),
                       failures(fits, "sparsity")), "no finished runs"),
        ("envelope", "Best loss per budget and sparsity" + (
            " with the fitted envelope; m: compute a sparsity saves over dense for the same loss."
            if envelope_fit is not None else " (the envelope law was not fitted)."),
         lambda: noted(plots.envelope_plot(points, envelope_fit), failures(fits, "envelope")), "no finished runs"),
        ("epochs", f"Loss against epochs over U = {plots.sci(unique_tokens)} unique tokens per model size" + (
            "; dashed curves: the fitted repetition law (dense); dashed vertical line: where a repeated token is "
            "worth half a new one (1 + R_D*·ln 2 epochs)." if fitted(repetition_law) else "."),
         lambda: noted(plots.epochs_plot(data.points, repetition_frame(repetition_law, data.points,
                                                                         unique_tokens),
                                         r_d_star(repetition_law)), failures(fits, "data-constrained")),
         "no finished runs"),
        ("gap", "Final eval minus final train loss against epochs: how much repetition overfits, by sparsity.",
         lambda: plots.gap_plot(data.finals), "no finished runs with both a final train and eval loss and epochs"),
        ("curves", "Eval loss during training at the largest budget against tokens and against wall-clock time.",
         lambda: plots.curves_plot(data.curves), "no logged eval losses"),
        ("router_load", "Load per expert and layer over training (1 = balanced), one run per sparsity.",
         lambda: plots.router_load_plot(data.router), moe),
        ("router_health", "Token dropping and the busiest expert's load over training, every MoE run.",
         lambda: plots.router_health_plot(data.router), moe),
        ("similarity", "Per-token eval-loss r² between pairs of runs over training (mean per pair kind, "
         f"95% bootstrap bands over eval positions; {data.similarity_note}).",
         lambda: plots.similarity_plot(data.similarity), data.similarity_note),
    ]
    specs += holdout_specs(fits)
    specs += [(name, extra.caption, functools.partial(extra.make, data, fits), extra.reason)
              for name, extra in FIGURES.items()]
    figures = []
    for name, caption, make, reason in specs:
        figure = Figure(name, caption)
        try:
            plot = make()
            if plot is None:
                figure.missing = reason
            else:
                figure.paths = plots.save(plot, folder / name)
        except Exception as e:  # one broken figure must not cost the report: it says so in place of the image
            figure.missing = f"could not be drawn: {type(e).__name__}: {e}"
            warnings.warn(f"figure {name}: {figure.missing}", stacklevel=2)
        figures.append(figure)
    return figures


# ---------------------------------------------------------------------------------------------- the answer


def compute_optimal_sentence(result: dict[str, Any] | None, budget: float | None = None,
                             unique_tokens: float | None = None) -> str:
    """The answer in one sentence from a sparsity-law fit (``fit_law(..., "sparsity", budget=C, unique_tokens=U)``).

    C and U are taken from the arguments, else from the optimum (keys C/budget, U/unique_tokens).
    """
    optimum = (result or {}).get("optimum") or {}
    if "S_star" not in optimum:
        return "The compute-optimal sparsity could not be determined (no sparsity-aware fit with an optimum)."
    budget = budget or optimum.get("C") or optimum.get("budget")
    unique_tokens = unique_tokens or optimum.get("U") or optimum.get("unique_tokens")
    ci = (result.get("ci") or {}).get("S_star")
    interval = f" (95% CI {ci[0]:.3g}–{ci[1]:.3g})" if ci and all(np.isfinite(ci[:2])) else ""
    where = f"At C = {plots.sci(budget)} FLOPs" if budget else "At the sweep's largest budget"
    data = f" with U = {plots.sci(unique_tokens)} unique tokens" if unique_tokens else ""
    epochs = f" ({optimum['epochs']:.1f} epochs)" if "epochs" in optimum else ""
    return (f"{where}{data}, the lowest loss is predicted at sparsity S* = {optimum['S_star']:.3g}{interval}, "
            f"N_active = {plots.sci(optimum['N_active'])}, D = {plots.sci(optimum['D'])} tokens{epochs}.")


def regimes_sentence(model: Any, level: float = 0.95) -> str:
    """The nonparametric answer (``SparsityVertex``, fitted) in words: S* per U with its interval at the largest
    budget, then the verdict."""
    top = model.s_star_["budget"].max()
    parts = []
    for r in model.s_star_[model.s_star_["budget"] == top].sort_values("unique_tokens", ascending=False).itertuples():
        interval = f" ({level:.0%} CI {r.S_lo:.3g}–{r.S_hi:.3g})" if np.isfinite(r.S_lo) else ""
        parts.append(f"S* = {r.S_star:.3g}{interval} with U = {plots.sci(r.unique_tokens)} unique tokens "
                     f"({r.regime})")
    return f"At C = {plots.sci(top)} FLOPs (isoFLOP vertices): {'; '.join(parts)}. Verdict: {model.verdict_}."


def regimes_answer(fit: Fit | None) -> dict[str, Any]:
    """answer.json's numbers of the nonparametric answer: S* per regime, their difference, L* per sparsity."""
    if fit is None or fit.model is None:
        return {}
    model, ci = fit.model, fit.result.get("ci", {})
    out: dict[str, Any] = {"verdict": model.verdict_}
    for name in ("S_star_plenty", "S_star_scarce", "S_star_difference"):
        if name in model.params_:
            out[name] = model.params_[name]
            if name in ci:
                out[f"{name}_ci"] = ci[name]
    top = model.vertices_["budget"].max()
    out["L_star"] = model.vertices_[model.vertices_["budget"] == top][
        ["unique_tokens", "regime", "sparsity", "loss_star", "loss_lo", "loss_hi", "n_star", "n_lo", "n_hi"]
    ].to_dict("records")
    return out


def answer(fits: list[Fit], budget: float, unique_tokens: float) -> dict[str, Any]:
    """The sentence and the numbers behind it (for ``answer.json`` and ``scaling demo``): from the isoFLOP vertices
    when the sweep compares unique-token limits, else from the sparsity-aware law."""
    fit = named(fits, "sparsity")
    result = fit.result if fit is not None else None
    vertex = named(fits, "sparsity-vertex")
    if vertex is not None and vertex.model is not None:
        sentence = regimes_sentence(vertex.model)
    else:
        sentence = compute_optimal_sentence(result, budget, unique_tokens)
        if fit is not None and fit.error:
            sentence += f" The sparsity-aware law could not be fitted: {fit.error}"
        if vertex is not None and vertex.error:
            sentence += f" Plenty vs scarce data could not be compared: {vertex.error}"
    out: dict[str, Any] = {"sentence": sentence, "budget": budget, "unique_tokens": unique_tokens,
                           **regimes_answer(vertex)}
    if result is not None:
        optimum, ci = result.get("optimum", {}), result.get("ci", {})
        for key in ("S_star", "N_active", "N_total", "D", "epochs", "loss"):
            if key in optimum:
                out[key] = float(optimum[key])
                if ci.get(key):
                    out[f"{key}_ci"] = [float(v) for v in ci[key][:2]]
    out["exponents"] = exponents(fits).to_dict("records")
    out["fits"] = {f.title: f.error or "ok" for f in fits}
    return out


# ---------------------------------------------------------------------------------------------- flags


def flags(data: SweepData, fits: list[Fit], save_error: str | None) -> list[str]:
    """What a reader must know: failed fits and runs, isoFLOP vertices outside the sampled range (or of parabolas
    that open downwards), an optimal sparsity outside the sampled ones. (The laws' notes are shown with each fit.)"""
    out = [f"{f.title}: could not be fitted: {f.error}" for f in fits if f.error]
    out += [f"{f.title}: {check}" for f in fits for check in f.checks]
    if save_error:
        out.append(f"fits were not saved in the store: {save_error}")
    status = data.runs["status"].value_counts()
    bad = {s: int(n) for s, n in status.items() if s != "ok"}
    if bad:
        out.append("runs not finished ok: " + ", ".join(f"{n} {s}" for s, n in sorted(bad.items()))
                   + " (left out of every fit and figure)")
    verts = vertices(fits, data.points)
    if verts is not None:
        for row in verts[~verts["in_range"].astype(bool)].to_dict("records"):
            sampled = data.points[(data.points["budget"] == row["budget"])
                                  & (data.points["sparsity"] == row["sparsity"])]["active_params"]
            where = f"{plots.variant_label(row['sparsity'])}, C = {plots.sci(row['budget'])}"
            span = f"{plots.sci(sampled.min())}–{plots.sci(sampled.max())}"
            if sampled.min() <= row["n_opt"] <= sampled.max():
                out.append(f"isoFLOP parabola without a minimum at {where} (sampled N {span}): no vertex used")
            else:
                side = "below" if row["n_opt"] < sampled.min() else "above"
                out.append(f"isoFLOP vertex outside the sampled range at {where}: N* = {plots.sci(row['n_opt'])} is "
                           f"{side} the sampled {span}; left out of the power-law fit")
    fit = named(fits, "sparsity") or Fit("", "", "")
    optimum = (fit.result or {}).get("optimum", {})
    levels = data.points["sparsity"]
    if "S_star" in optimum and len(levels) and math.isclose(optimum["S_star"], levels.max(), abs_tol=1e-9):
        out.append(f"the optimal sparsity S* = {optimum['S_star']:.3g} is the sparsest sampled: sparser models "
                   "might be better still (sample more experts to find the optimum)")
    if "N_active" in optimum and fit.model is not None:
        lo, hi = fit.model.tokens_per_active_
        n_lo, n_hi = fit.model.supported_sizes(optimum["C"])
        if not n_lo * 1.02 < optimum["N_active"] < n_hi / 1.02:
            out.append(f"the sparsity-aware law's optimum N_active = {plots.sci(optimum['N_active'])} lies at the "
                       f"edge of the sizes its runs support at this budget ({plots.sci(n_lo)}–{plots.sci(n_hi)}, "
                       f"{lo:.3g}–{hi:.3g} tokens per active parameter): the true optimum may lie beyond")
    return out


# ---------------------------------------------------------------------------------------------- HTML

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 2rem 4rem; background: #fff; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; margin-top: 2.5rem; }
h3 { font-size: 1.05rem; margin: 1.5rem 0 .4rem; }
.meta { color: #666; font-size: .9rem; }
.answer { font-size: 1.15rem; background: #eef5ff; border-left: 4px solid #3a6fd8; padding: .8rem 1rem; }
.flags li { color: #8a4b00; } .notes { color: #555; font-size: .85rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .4rem 0; }
th, td { padding: .2rem .6rem; border-bottom: 1px solid #e4e4e4; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
table.wrap td:last-child { white-space: normal; overflow-wrap: anywhere; text-align: left; }
.scroll { max-height: 28rem; overflow: auto; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: .5rem .8rem; font-size: .8rem; overflow-x: auto; border-radius: 3px; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: .9rem; } .missing { color: #8a4b00; font-style: italic; }
.fits { display: flex; flex-wrap: wrap; gap: 0 2rem; } .fits > div { min-width: 20rem; }
"""


def cell(value: Any, column: str) -> str:
    """A table cell's text: budgets 1e11, counts with thousands separators, floats to 4 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or value is pd.NA:
        return ""
    if column in ("budget", "budget C"):
        return plots.sci(float(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v.is_integer() and abs(v) < 1e15 and column not in ("S", "value", "ci_lo", "ci_hi"):
            return f"{int(v):,}"
        return f"{v:.4g}"
    return str(value)


def html_table(frame: pd.DataFrame, query: str | None = None, scroll: bool = False, wrap: bool = False) -> str:
    """A table, then the SQL that reproduces it."""
    text = {c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])}
    head = "".join(f'<th class="{"text" if c in text else ""}">{html.escape(str(c))}</th>' for c in frame.columns)
    body = "".join("<tr>" + "".join(f'<td class="{"text" if c in text else ""}">{html.escape(cell(v, c))}</td>'
                                    for c, v in zip(frame.columns, row, strict=True)) + "</tr>"
                   for row in frame.itertuples(index=False))
    table = f'<table class="{"wrap" if wrap else ""}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    if scroll:
        table = f'<div class="scroll">{table}</div>'
    return table + (f"<pre>{html.escape(query)}</pre>" if query else "")


def figure_html(figure: Figure) -> str:
    if figure.missing:
        return (f'<figure id="{figure.name}"><p class="missing">Not drawn: {html.escape(figure.missing)}.</p>'
                f"<figcaption>When drawn: {html.escape(figure.caption)}</figcaption></figure>")
    png = next(p for p in figure.paths if p.suffix == ".png")
    svg = next(p for p in figure.paths if p.suffix == ".svg")
    data = base64.b64encode(png.read_bytes()).decode()
    return (f'<figure id="{figure.name}"><img src="data:image/png;base64,{data}" alt="{html.escape(figure.caption)}">'
            f'<figcaption>{html.escape(figure.caption)} <a href="figures/{svg.name}">SVG</a></figcaption></figure>')


def fit_html(fit: Fit, sweep: str) -> str:
    title = f"<h3>{html.escape(fit.title)}</h3>"
    if fit.error:
        return f'<div>{title}<p class="missing">Could not be fitted: {html.escape(fit.error)}</p></div>'
    n = (fit.result or {}).get("n_points")
    query = (FIT_SQL.format(fit_id=literal(fit.fit_id)) if fit.fit_id else
             f"-- not saved in the store; from a save it would be:\n{FIT_SQL.format(fit_id=literal('...'))}")
    sel = html.escape(sql(fit.selection, sweep))
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in (fit.result or {}).get("notes", []))
    law = LAWS[fit.law].formula((fit.result or {}).get("params", {})) if parametric(fit.law) else None
    law_html = f"<p class=meta>fitted: <code>{html.escape(law)}</code></p>" if law else ""
    return (f"<div>{title}<p class=meta>{n} points; selection: <code>{sel}</code></p>{law_html}"
            f"{html_table(fit.table if fit.stored is None else fit.stored, query)}"
            f"{f'<ul class=notes>{notes}</ul>' if notes else ''}</div>")


def external_note(config: dict[str, Any]) -> list[str]:
    """For a sweep of runs trained elsewhere (``scaling ingest``): where they came from and what they lack."""
    if config.get("source") != "external":
        return []
    curves = "" if config.get("curves") else ", training curves (none were ingested)"
    return [f"<p class=meta>External sweep ingested from {html.escape(str(config.get('file')))}: its runs have no "
            f"run files, so there are no router statistics or per-token losses{curves}; figures and laws without "
            "the data they need say so in their place.</p>"]


def page(sweep: str, db: str | None, data: SweepData, fits: list[Fit], figures: list[Figure], result: dict[str, Any],
         notes: list[str], bootstrap: int) -> str:
    """The whole report as one HTML page (no external resources)."""
    runs = data.run_table.rename(columns=RUN_COLUMNS)
    status = ", ".join(f"{n} {s}" for s, n in data.runs["status"].value_counts().items())
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    flag_html = ("<ul class=flags>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>") if notes else (
        "<p>None: every law was fitted and every isoFLOP vertex lies inside the sampled range.</p>")
    settings = data.settings.assign(value=data.settings["value"].astype(str))
    parts = [
        f"<h1>Scaling report: sweep {html.escape(sweep)}</h1>",
        f"<p class=meta>{len(data.runs)} runs ({html.escape(status)}); store {html.escape(str(db_path(db)))}; "
        f"{bootstrap} bootstrap resamples over runs; generated {generated}.</p>",
        *([f"<p class=meta>{html.escape(saved)}.</p>"] if (saved := savings_note(data.runs)) else []),
        *external_note(data.config),
        f'<p class="answer">{html.escape(result["sentence"])}</p>',
        "<h2>Flags</h2>", flag_html,
        "<h2>Figures</h2>", *[figure_html(f) for f in figures],
        "<h2>Fitted laws</h2>",
        "<p>Values with 95% percentile intervals from the bootstrap over runs (empty without resamples).</p>",
        '<div class="fits">', *[fit_html(f, sweep) for f in fits], "</div>",
        "<h2>Runs</h2>", html_table(runs, sql(RUNS_SQL, sweep), scroll=True),
        "<h2>Settings</h2>", html_table(settings, sql(SETTINGS_SQL, sweep), wrap=True),
    ]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>Scaling report: {html.escape(sweep)}</title><style>{CSS}</style></head>"
            f"<body><main>\n{body}\n</main></body></html>\n")


# ---------------------------------------------------------------------------------------------- entry point


def write_report(db: str | None, sweep: str, out: Path, bootstrap: int = 200) -> Path:
    """Fit, draw and write the report of ``sweep`` under ``out``; returns ``out/index.html``."""
    out = Path(out)
    data = read_sweep(db, sweep, bootstrap)
    if data.points.empty:
        raise StoreError(f"sweep {sweep!r} has no finished runs to report on (`scaling status {sweep}` says why)")
    budgets = data.config.get("budgets") or sorted(data.points["budget"].unique())
    budget = float(max(budgets)) if len(budgets) else math.nan
    limit = data.config.get("unique_tokens") or data.points["unique_tokens"].max()
    unique_tokens = float(limit) if pd.notna(limit) else math.nan  # external sweeps may not say
    fits = fit_all(data, bootstrap, budget, unique_tokens)
    save_error = save_fits(db, sweep, fits)
    check_extrapolation(fits, bootstrap)
    figures = draw(data, fits, unique_tokens, out / "figures")
    result = answer(fits, budget, unique_tokens)
    notes = flags(data, fits, save_error)
    index = out / "index.html"
    index.write_text(page(sweep, db, data, fits, figures, result, notes, bootstrap), encoding="utf-8")
    (out / "answer.json").write_text(json.dumps({**result, "report": str(index.absolute()), "flags": notes},
                                                indent=2, default=float, ensure_ascii=False), encoding="utf-8")
    return index
