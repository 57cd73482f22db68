"""Extrapolation check (``scaling fit ... --holdout-largest K``): fit a parametric law on all but the K largest
compute budgets, predict the held-out runs with ``predict.prediction_table``'s intervals, and say how far off the
predictions are: mean and max absolute error in nats and as a fraction of the loss gap to the law's irreducible
loss (L − E: the part of the loss the law is about), and how many held-out runs its prediction intervals cover.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from scaling.laws import LAWS, FitError, budget_groups, summarize
from scaling.predict import parametric, prediction_table


def holdout_fit(frame: pd.DataFrame, law: str, k: int, *, bootstrap: int = 0, seed: int = 0, level: float = 0.95,
                budget: float | None = None, unique_tokens: float | None = None, **options: Any) -> dict[str, Any]:
    """``fit_law``'s summary of the law fitted on all but the ``k`` largest budgets, with ``holdout``: the
    held-out budgets, one row per held-out run (observed, predicted, intervals, error) and the summary."""
    if not parametric(law):
        raise FitError(f"--holdout-largest checks a law that predicts new points: "
                       f"{', '.join(k for k in LAWS if parametric(k))}, not {law}")
    budgets = budget_groups(frame)
    levels = np.unique(budgets)
    if k < 1 or len(levels) < k + 2:
        raise FitError(f"--holdout-largest {k} needs at least {k + 2} budgets (the runs have {len(levels)}): "
                       "the law is fitted on the others")
    held = budgets >= levels[-k]
    train, test = frame[~held], frame[held]
    model = LAWS[law](bootstrap=bootstrap, seed=seed, level=level, **options).fit(train)
    result = summarize(model, law, budget, unique_tokens)
    table = prediction_table(model, train, test.drop(columns="loss"), level=level, seed=seed)
    table = table.rename(columns={"loss": "predicted"}).assign(observed=test["loss"].to_numpy(float),
                                                               budget=budgets[held])
    floor = model.params_[model.floor]
    table["error"] = table["predicted"] - table["observed"]
    table["error_fraction"] = table["error"].abs() / (table["observed"] - floor)
    table["covered"] = (table["pi_lo"] <= table["observed"]) & (table["observed"] <= table["pi_hi"])
    summary = {"held_out_budgets": [float(b) for b in levels[-k:]], "n_held_out": int(held.sum()),
               "n_fitted": int((~held).sum()), "mean_abs_error": float(table["error"].abs().mean()),
               "max_abs_error": float(table["error"].abs().max()),
               "mean_error_fraction": float(table["error_fraction"].mean()),
               "max_error_fraction": float(table["error_fraction"].max()),
               "coverage": float(table["covered"].mean()) if bootstrap else float("nan"), "level": level}
    columns = [c for c in ("run_id", "budget", "params", "active_params", "tokens", "unique_tokens", "sparsity",
                           "observed", "predicted", "ci_lo", "ci_hi", "pi_lo", "pi_hi", "error", "error_fraction",
                           "covered") if c in table]
    result["notes"].append(
        f"holdout: fitted on {summary['n_fitted']} runs below C = {levels[-k]:.3g}; the {summary['n_held_out']} "
        f"held-out runs are off by {summary['mean_abs_error']:.3g} nats on average (max "
        f"{summary['max_abs_error']:.3g}), {summary['mean_error_fraction']:.1%} of their loss above {model.floor} "
        f"(max {summary['max_error_fraction']:.1%})"
        + (f"; {level:.0%} prediction intervals cover {summary['coverage']:.0%} of them" if bootstrap
           else "; give --bootstrap N for the prediction intervals' coverage"))
    result["holdout"] = {"summary": summary, "runs": table[columns].to_dict("records")}
    return result
