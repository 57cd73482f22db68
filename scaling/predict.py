"""``scaling predict``: a saved parametric fit's loss at new (N, D[, S, U]), with two intervals.

- confidence interval: the spread of the law's prediction over a bootstrap over runs (Efron & Tibshirani 1993):
  the fit's stored selection (``fits.selection``) is run again on the store and the law refitted on resamples of
  those runs, as ``scaling fit --bootstrap`` does;
- prediction interval: where a new run's loss would fall, the prediction of each resample times a residual of
  the fit drawn at random (the laws fit log L, so residuals are log L − log L̂, multiplicative), the residuals
  inflated by sqrt(n/(n − p)) for the p parameters fitted to them (the usual degrees-of-freedom correction).

Each law's ``formula`` writes it with its fitted numbers in, so a reader can recompute a prediction by hand.
"""

from __future__ import annotations

import json
import math
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from scaling.laws import LAWS, FitError, Law
from scaling.store import StoreError, connect

POINT_COLUMNS = ["params", "tokens", "sparsity", "unique_tokens"]
RESIDUAL_DRAWS = 20  # residuals drawn per bootstrap resample for the prediction interval


def parametric(law: str) -> bool:
    """Whether ``law`` (a key of ``LAWS``) is a closed-form law of N, D, ... that predicts any point."""
    return hasattr(LAWS.get(law), "spec")


def prediction_table(model: Law, runs: pd.DataFrame, points: pd.DataFrame, params: dict[str, float] | None = None,
                     level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """``points`` with the predicted ``loss`` (under ``params``, by default the model's own), the confidence
    interval ``ci_lo``–``ci_hi`` (percentiles over ``model.bootstrap_``; NaN without bootstrap) and the
    prediction interval ``pi_lo``–``pi_hi`` (adding residuals of ``runs``, the fitted runs, drawn at random)."""
    params = params or model.params_
    loss = model.predict_with(points, params)
    residuals = np.log(runs["loss"].to_numpy(float)) - np.log(model.predict_with(runs, params))
    n, p = len(residuals), int(sum(name not in getattr(model, "frozen", {}) for _, name, _ in model.spec))
    residuals = residuals * math.sqrt(n / max(n - p, 1))
    rng = np.random.default_rng(seed)
    if model.bootstrap_ is not None and len(model.bootstrap_):
        draws = np.array([model.predict_with(points, row) for row in model.bootstrap_.to_dict("records")])
    else:
        draws = loss[None]
    tails = [50 * (1 - level), 50 * (1 + level)]
    with np.errstate(invalid="ignore"):
        ci = np.nanpercentile(draws, tails, axis=0) if len(draws) > 1 else np.full((2, len(points)), np.nan)
        noise = np.exp(rng.choice(residuals, size=(len(draws), RESIDUAL_DRAWS, 1)))
        pi = np.nanpercentile((draws[:, None, :] * noise).reshape(-1, len(points)), tails, axis=0)
    return points.assign(loss=loss, ci_lo=ci[0], ci_hi=ci[1], pi_lo=pi[0], pi_hi=pi[1])


def saved_fit(con: duckdb.DuckDBPyConnection, fit_id: str) -> dict[str, Any]:
    """The ``fits`` row of ``fit_id`` (law, result, selection); an unknown id names the latest ones."""
    row = con.execute("SELECT law, result, selection, sweep FROM fits WHERE fit_id = ?", [fit_id]).fetchall()
    if not row:
        latest = [f for (f,) in con.execute("SELECT fit_id FROM fits ORDER BY created_at DESC LIMIT 3").fetchall()]
        raise StoreError(f"no fit {fit_id!r} in the store (latest: {', '.join(latest) or 'none'}; "
                         "SELECT fit_id FROM fits lists them)")
    law, result, selection, sweep = row[0]
    if not parametric(law):
        raise FitError(f"fit {fit_id} is a {law} fit, which predicts no new points; predict from a "
                       f"{', '.join(k for k in LAWS if parametric(k))} fit")
    return {"law": law, "result": json.loads(result), "selection": selection, "sweep": sweep}


def complete_points(points: pd.DataFrame, law: str) -> tuple[pd.DataFrame, list[str]]:
    """Defaults for the columns a law may need: S = 0 (dense) and U = D (no repetition; said so where ``law``
    uses U)."""
    notes = []
    points = points.copy()
    if "sparsity" not in points or points["sparsity"].isna().any():
        points["sparsity"] = points.get("sparsity", pd.Series(np.nan, index=points.index)).fillna(0.0)
    if "unique_tokens" not in points or points["unique_tokens"].isna().any():
        given = points.get("unique_tokens", pd.Series(np.nan, index=points.index))
        if given.isna().any() and LAWS[law].uses_unique_tokens:
            notes.append("no unique_tokens given: U = D (every token seen once)")
        points["unique_tokens"] = given.fillna(points["tokens"])
    return points, notes


def predict(db: str | None, fit_id: str, points: pd.DataFrame, bootstrap: int = 200, seed: int = 0,
            level: float = 0.95) -> tuple[pd.DataFrame, list[str]]:
    """Predictions of saved fit ``fit_id`` at ``points`` (columns ``params``, ``tokens``, optionally
    ``sparsity``, ``unique_tokens``) with confidence and prediction intervals, and notes."""
    con = connect(db, read_only=True)
    try:
        fit = saved_fit(con, fit_id)
        runs = con.execute(fit["selection"]).df()
    finally:
        con.close()
    if runs.empty:
        raise FitError(f"the selection of fit {fit_id} now matches no runs: {fit['selection']}")
    points, notes = complete_points(points, fit["law"])
    options = fit["result"].get("options", {})
    model = LAWS[fit["law"]](bootstrap=bootstrap, seed=seed, level=level, **options).fit(runs)
    saved = fit["result"]["params"]
    refit = {k: model.params_[k] for k in saved}
    if not all(math.isclose(saved[k], refit[k], rel_tol=1e-4) for k in saved):
        notes.append(f"the runs behind fit {fit_id} changed since it was saved (refit differs): intervals are "
                     "around the refit, the prediction is the saved fit's")
    table = prediction_table(model, runs, points, saved, level, seed)
    notes.append(f"confidence interval: {level:.0%} bootstrap over the fit's {len(runs)} runs "
                 f"({0 if model.bootstrap_ is None else len(model.bootstrap_)} resamples); prediction interval: "
                 "adds the fit's residual scatter")
    return table, notes
