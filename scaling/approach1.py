"""Chinchilla approach 1 (Hoffmann et al. 2022, §3.1): the compute-optimal model size from training curves.

Every run's curve gives its loss as a function of the FLOPs spent so far, C = 6·N·D_seen (or the exact count,
prorated over the run's tokens, when a ``flops`` column gives it). At each of ``points`` log-spaced budgets
between the smallest and the largest final FLOPs of the runs, the lower envelope over all runs' curves (each
interpolated linearly in log C within its logged range) is the lowest loss any run reached with that compute; the
run achieving it gives N*(C), its tokens D*(C) there. Then log N* = log k_N + a·log C and log D* = log k_D +
b·log C by least squares over the budgets. Budgets whose best run is the smallest or the largest size are left out
(the optimum may lie beyond the sampled sizes: the envelope there is that run's own curve).

Caveat (Hoffmann et al.): a point partway through a run is not what a run of that length would reach with its own
learning-rate schedule (the cosine has not decayed yet), so approach 1 wants runs of several lengths per size or
a schedule whose intermediate points are near-optimal (e.g. warmup-stable-decay cooldowns).

Intervals: a bootstrap over runs (a resample's distinct runs make its envelope), percentile intervals of a, b, k.
Input, one row per logged point: ``run_id``, the size column ``x`` (``active_params`` by default; ``params`` as
Chinchilla counted), ``tokens`` (seen so far), ``loss``, optionally ``flops`` (spent so far).
"""

from __future__ import annotations

import math
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from scaling.bootstrap import percentile_intervals
from scaling.laws import FitError, Law, _columns, summarize
from scaling.store import connect, literal, save_fit

LAW = "approach1"
CURVES_SQL = """SELECT c.run_id, c.sparsity, c.params, c.active_params, c.tokens, c.eval_loss AS loss,
       c.tokens * r.flops / r.tokens AS flops
FROM training_curves c JOIN runs r USING (run_id)
WHERE c.sweep = {sweep} AND r.status = 'ok' AND c.eval_loss IS NOT NULL AND c.tokens > 0"""
"""The store's curves of one sweep's finished runs, FLOPs spent so far prorated from the run's exact count."""


class CurveEnvelope(Law):
    """Chinchilla approach 1 over training curves (see the module docstring): ``params_`` a, k_N, b, k_D;
    ``envelope_`` one row per budget: C, loss, run_id, N (``x``), D, edge (best run at a sampled extreme)."""

    name = "CurveEnvelope"
    title = "Chinchilla approach 1 (training curves)"
    optimum_returns = ("C", "N_opt", "D_opt")
    report_runs = None  # fitted to training curves, not to the runs' final losses

    def __init__(self, *, x: str = "active_params", points: int = 200, bootstrap: int = 0, seed: int = 0,
                 level: float = 0.95):
        super().__init__(bootstrap=bootstrap, seed=seed, level=level)
        if x not in ("active_params", "params"):
            raise FitError(f"x must be 'active_params' or 'params', not {x!r}")
        self.x, self.points = x, points
        self.envelope_ = pd.DataFrame()

    def fit(self, frame: pd.DataFrame) -> CurveEnvelope:
        self._reset()
        curves = self._curves(frame)
        self.n_points_ = sum(len(c["log_c"]) for c in curves)
        self.envelope_ = envelope(curves, self._grid(curves))
        self.params_ = power_laws(self.envelope_)
        edge = int(self.envelope_["edge"].sum())
        if edge:
            self.notes_.append(f"{edge} of {len(self.envelope_)} budgets have the smallest or largest run on the "
                               "envelope: left out of the power laws")
        self.objective_ = self.params_.pop("rss")
        if self.bootstrap:
            runs = np.arange(len(curves))
            rng = np.random.default_rng(self.seed)
            rows = []
            for _ in range(self.bootstrap):
                chosen = np.unique(rng.choice(runs, len(runs)))
                try:
                    fitted = power_laws(envelope([curves[i] for i in chosen], self._grid(curves)))
                    rows.append({k: fitted[k] for k in self.params_})
                except FitError:
                    rows.append({})
            self.bootstrap_ = pd.DataFrame(rows, columns=list(self.params_)).dropna().reset_index(drop=True)
            if len(self.bootstrap_) < self.bootstrap:
                self.notes_.append(f"{self.bootstrap - len(self.bootstrap_)} of {self.bootstrap} resamples had too "
                                   "few runs for an envelope and were left out")
            self.ci_.update(percentile_intervals(self.bootstrap_, self.level))
            self.notes_.append(f"intervals: {self.level:.0%} bootstrap percentile over runs "
                               f"({len(self.bootstrap_)} resamples)")
        else:
            self.notes_.append("no intervals without bootstrap")
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Not a loss model: the envelope of the curves is the answer (``envelope_``)."""
        raise FitError(f"{self.name} predicts no losses; read envelope_")

    def _optimum(self, C: float, params: dict[str, float], **limits: Any) -> dict[str, float]:
        """N* = k_N·C^a and D* = k_D·C^b at budget C."""
        p = params
        return {"C": float(C), "N_opt": p["k_N"] * C ** p["a"], "D_opt": p["k_D"] * C ** p["b"]}

    def _curves(self, frame: pd.DataFrame) -> list[dict[str, Any]]:
        if "run_id" not in frame:
            raise FitError(f"{self.name} needs a run_id column naming each point's run")
        cols = _columns(frame, self.name, [self.x, "tokens", "loss"], positive=[self.x, "tokens", "loss"])
        flops = (pd.to_numeric(frame["flops"], errors="coerce").to_numpy(float) if "flops" in frame
                 else np.full(len(frame), np.nan))
        flops = np.where(np.isfinite(flops) & (flops > 0), flops, 6 * cols[self.x] * cols["tokens"])
        curves = []
        for run, idx in pd.Series(np.arange(len(frame))).groupby(frame["run_id"].to_numpy()).groups.items():
            idx = np.asarray(idx)
            order = idx[np.argsort(flops[idx])]
            log_c, keep = np.unique(np.log(flops[order]), return_index=True)
            if len(log_c) < 2:
                continue
            curves.append({"run_id": run, "n": float(cols[self.x][order[0]]), "log_c": log_c,
                           "loss": cols["loss"][order][keep], "tokens": cols["tokens"][order][keep]})
        if len({c["n"] for c in curves}) < 3:
            raise FitError(f"{self.name} needs curves (2+ logged points each) of 3 or more model sizes; got "
                           f"{len({c['n'] for c in curves})}")
        return curves

    def _grid(self, curves: list[dict[str, Any]]) -> np.ndarray:
        finals = [c["log_c"][-1] for c in curves]
        return np.linspace(min(finals), max(finals), self.points)


def envelope(curves: list[dict[str, Any]], grid: np.ndarray) -> pd.DataFrame:
    """The lowest loss over the runs at each log-budget of ``grid``, the run reaching it, its size and tokens."""
    losses = np.full((len(curves), len(grid)), np.inf)
    for i, c in enumerate(curves):
        inside = (grid >= c["log_c"][0]) & (grid <= c["log_c"][-1])
        losses[i, inside] = np.interp(grid[inside], c["log_c"], c["loss"])
    best = losses.argmin(axis=0)
    sizes = np.array([c["n"] for c in curves])
    covered = np.isfinite(losses.min(axis=0))
    tokens = np.array([np.exp(np.interp(g, curves[b]["log_c"], np.log(curves[b]["tokens"])))
                       for g, b in zip(grid, best, strict=True)])
    frame = pd.DataFrame({"C": np.exp(grid), "loss": losses.min(axis=0),
                          "run_id": [curves[b]["run_id"] for b in best], "N": sizes[best], "D": tokens,
                          "edge": (sizes[best] == sizes.min()) | (sizes[best] == sizes.max())})
    return frame[covered].reset_index(drop=True)


def power_laws(env: pd.DataFrame) -> dict[str, float]:
    """Least-squares lines log N* = log k_N + a·log C and log D* = log k_D + b·log C over the interior budgets,
    and their residual sum of squares (``rss``, of log N*)."""
    inner = env[~env["edge"]]
    if inner["N"].nunique() < 2:
        raise FitError(f"{CurveEnvelope.name}: fewer than 2 distinct runs on the envelope away from the sampled "
                       "extremes; sample more sizes")
    log_c = np.log(inner["C"].to_numpy(float))
    out = {}
    for name, k, col in (("a", "k_N", "N"), ("b", "k_D", "D")):
        slope, intercept = np.polyfit(log_c, np.log(inner[col].to_numpy(float)), 1)
        out[name], out[k] = float(slope), float(math.exp(intercept))
        if col == "N":
            out["rss"] = float(np.sum((np.log(inner[col]) - intercept - slope * log_c) ** 2))
    return out


def curves_sql(sweep: str, where: str | None = None, sparsity: float | None = None) -> str:
    """The query selecting a fit's curve points (``sweep`` as a SQL literal)."""
    conditions = [f"abs(sparsity - {float(sparsity)!r}) < 1e-6"] if sparsity is not None else []
    conditions += [f"({where})"] if where else []
    query = CURVES_SQL.format(sweep=sweep)
    return f"SELECT * FROM ({query}) WHERE {' AND '.join(conditions)}" if conditions else query


def fit_curves(frame: pd.DataFrame, source: str, bootstrap: int = 0, seed: int = 0, budget: float | None = None,
               **options: Any) -> dict[str, Any]:
    """Approach 1 on curve points of one sparsity, summarised as ``laws.fit_law`` summarises a law."""
    if "sparsity" in frame and frame["sparsity"].nunique() > 1:
        levels = ", ".join(f"{s:g}" for s in sorted(frame["sparsity"].unique()))
        raise FitError(f"approach 1 compares runs of one sparsity and {source} has curves at sparsities {levels}: "
                       "choose one with --sparsity")
    model = CurveEnvelope(bootstrap=bootstrap, seed=seed, **options).fit(frame)
    result = summarize(model, LAW, budget)
    result["envelope"] = model.envelope_.to_dict("records")
    return result


def fit_sweep_curves(db: str | None, sweep: str, where: str | None = None, sparsity: float | None = None,
                     **options: Any) -> dict[str, Any]:
    """Approach 1 on a sweep's stored training curves (``training_curves``), saved in the ``fits`` table."""
    selection = curves_sql(literal(sweep), where, sparsity)
    con = connect(db, read_only=True)
    try:
        frame = con.execute(selection).df()
    except duckdb.Error as e:
        raise FitError(f"--where {where!r}: {str(e).splitlines()[0]}") from None
    finally:
        con.close()
    if frame.empty:
        raise FitError(f"sweep {sweep!r} has no stored training curves{' matching the selection' * bool(where)} "
                       "(ingest them with scaling ingest --curves, or train the sweep)")
    result = fit_curves(frame, f"sweep {sweep!r}", **options)
    con = connect(db)
    try:
        save_fit(con, sweep, {k: v for k, v in result.items() if k != "envelope"}, selection)
    finally:
        con.close()
    return result
