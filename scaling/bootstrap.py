"""Bootstrap over runs: resampling weights and percentile intervals, shared by every law.

A resample draws RUNS with replacement (Efron & Tibshirani 1993, the nonparametric bootstrap): rows that
share a ``run_id`` (e.g. several checkpoints of one run) move together, and with ``strata`` (e.g. the isoFLOP
budgets of a designed sweep) runs are drawn within each stratum, so every budget keeps its number of runs.
A resample is represented by how many times each row was drawn, so a law refits all resamples at once as
weighted fits (vectorised: no process pool needed).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def resample_weights(n_resamples: int, clusters: np.ndarray, seed: int | np.random.Generator | None = 0,
                     strata: np.ndarray | None = None) -> np.ndarray:
    """How often each row is drawn, (n_resamples, n_rows): runs (``clusters``, one label per row) are drawn
    with replacement, within each stratum when ``strata`` (one label per row) is given."""
    rng = np.random.default_rng(seed)
    run_codes, run_of_row = np.unique(np.asarray(clusters), return_inverse=True)
    run_stratum = np.zeros(len(run_codes), int)
    if strata is not None:
        _, stratum_of_row = np.unique(np.asarray(strata), return_inverse=True)
        run_stratum[run_of_row] = stratum_of_row
    counts = np.zeros((n_resamples, len(run_codes)))
    for stratum in np.unique(run_stratum):
        runs = np.flatnonzero(run_stratum == stratum)
        draws = rng.integers(0, len(runs), size=(n_resamples, len(runs)))
        np.add.at(counts, (np.arange(n_resamples)[:, None], runs[draws]), 1.0)
    return counts[:, run_of_row]


def percentile_intervals(samples: pd.DataFrame, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """The (1 − level)/2 and (1 + level)/2 percentiles of each column, ignoring failed (NaN) resamples."""
    out = {}
    for name in samples.columns:
        values = samples[name].to_numpy(float)
        values = values[np.isfinite(values)]
        if values.size >= 2:
            lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
            out[name] = (float(lo), float(hi))
    return out
