"""The sparsity answer without a ten-parameter law: isoFLOP vertices per (U, C, S) and the optimal sparsity S*.

Per unique-token limit U, budget C and sparsity S, the isoFLOP parabola of loss in log10 N_active (Chinchilla
approach 2, Hoffmann et al. 2022; ``laws._parabolas``) gives the vertex (N*, L*). The parabola is fitted to the
sizes nearest the curve's lowest mean loss (half of them, at least 3: ``near_minimum``), not to all of them: an
isoFLOP curve is a parabola only near its minimum, and over a wide span (a 20× range of sizes) its asymmetry pulls a
parabola through every size off the lowest runs (measured: 0.05 nats above the best runs of a sparse curve), which
would bias L* upwards by an amount that differs between sparsities. At fixed (C, U),
S* = argmin over the sampled sparsities of L*, refined by the parabola of L* in log E (E/k = 1/(1 − S), experts
per routing choice) through the lowest sparsity and its two neighbours; at the densest or sparsest sampled level
S* stays there (clipped to the sampled range). The user's question (does scarce data move the optimum to an
interior sparsity?) is the difference S*(C, U_scarce) − S*(C, U_plenty) and the shift of N* between the regimes,
N*_scarce / N*_plenty per sparsity. Every interval is the percentile bootstrap over runs (``scaling.bootstrap``),
runs drawn within each (U, C, S) curve, and every quantity comes from the same resamples (so the difference has
its own interval, not one built from two). Nothing here is parametric; ``laws.Sparsity`` is the cross-check.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from scaling.bootstrap import percentile_intervals, resample_weights
from scaling.laws import LAWS, FitError, Law, _columns, _parabolas, budget_groups

MIN_SIZES = 3  # distinct active sizes per isoFLOP curve: a parabola needs three


def num(value: float) -> str:
    """1e5, 5e11, 3.2e11: compact numbers for parameter names."""
    return f"{value:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def key(name: str, U: float | None = None, C: float | None = None, S: float | None = None) -> str:
    """A parameter's name with its cell, e.g. ``L_star[U=1e5,C=5e11,S=0.875]``."""
    where = ",".join(f"{k}={num(v) if k != 'S' else f'{v:g}'}" for k, v in (("U", U), ("C", C), ("S", S))
                     if v is not None)
    return f"{name}[{where}]" if where else name


def refined_argmin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per row of y (R, m) over levels x (m,) ascending: the vertex of the parabola through the lowest point and
    its two neighbours, or the lowest x itself at either end; NaN where a row has a NaN."""
    R = len(y)
    out = np.full(R, np.nan)
    ok = np.isfinite(y).all(axis=1)
    if not ok.any():
        return out
    i = np.nanargmin(np.where(ok[:, None], y, np.inf), axis=1)
    out[ok] = x[i[ok]]
    inner = ok & (i > 0) & (i < len(x) - 1)
    if inner.any():
        r, j = np.flatnonzero(inner), i[inner]
        x0, x1, x2 = x[j - 1], x[j], x[j + 1]
        y0, y1, y2 = y[r, j - 1], y[r, j], y[r, j + 1]
        num_ = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
        den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
        with np.errstate(all="ignore"):
            vertex = x1 - 0.5 * num_ / den
        out[r] = np.clip(np.where(np.isfinite(vertex), vertex, x1), x0, x2)
    return out


def curve_minima(par: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(log10 N*, L*) per (resample, curve) from ``_parabolas``: the vertex where it lies inside the sampled
    sizes, else the lower end of the parabola over them (so a resample that tips a curve still counts, at an
    edge); NaN where fewer than 3 sizes were drawn."""
    coef, center = par["coef"], par["center"][None]
    ends = np.stack([par["lo"], par["hi"]])
    v = ends - center
    at_ends = coef[..., 0] + coef[..., 1] * v + coef[..., 2] * v * v
    lower = np.argmin(np.nan_to_num(at_ends, nan=np.inf), axis=0)
    end_n = np.take_along_axis(ends, lower[None], 0)[0]
    end_l = np.take_along_axis(at_ends, lower[None], 0)[0]
    inside = par["in_range"] & np.isfinite(par["vertex"])
    return np.where(inside, par["vertex"], end_n), np.where(inside, par["value"], end_l)


def curve_resamples(n_resamples: int, runs: np.ndarray, curves: np.ndarray, log_n: np.ndarray,
                    seed: int, tries: int = 200) -> np.ndarray:
    """Bootstrap draw counts (n_resamples, rows) over runs within each curve (``scaling.bootstrap``), each curve's
    draw repeated until it holds ``MIN_SIZES`` distinct sizes: the bootstrap conditional on a curve that has a
    vertex (a curve of 5 sizes drawn with replacement has fewer 1 time in 10, and dropping such resamples would
    drop most resamples of a sweep with dozens of curves)."""
    rng = np.random.default_rng(seed)
    W = resample_weights(n_resamples, runs, rng, strata=curves)
    for g in np.unique(curves):
        idx = np.flatnonzero(curves == g)
        _, size_of = np.unique(log_n[idx], return_inverse=True)
        onehot = np.eye(size_of.max() + 1)[size_of]
        for _ in range(tries):
            bad = ((W[:, idx] > 0) @ onehot > 0).sum(axis=1) < MIN_SIZES
            if not bad.any():
                break
            W[np.ix_(bad, idx)] = resample_weights(int(bad.sum()), runs[idx], rng)
    return W


def near_minimum(W: np.ndarray, log_n: np.ndarray, loss: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """W (R, n) with each curve's weight kept only on its sizes nearest its minimum, per resample: of the sizes a
    resample drew, the ``max(3, ceil(m / 2))`` consecutive ones (m drawn) centred on the size of lowest weighted
    mean loss, shifted inwards at either end. The window is chosen again in every resample, so the bootstrap
    interval includes the choice."""
    out = np.zeros_like(W)
    for g in np.unique(cells):
        idx = np.flatnonzero(cells == g)
        sizes, size_of = np.unique(log_n[idx], return_inverse=True)
        onehot = np.eye(len(sizes))[size_of]  # (rows, sizes): a curve has a handful of sizes
        drawn = W[:, idx] @ onehot  # (R, sizes) weight per size
        with np.errstate(all="ignore"):
            mean = (W[:, idx] * loss[idx]) @ onehot / drawn
        for r in range(len(W)):
            present = np.flatnonzero(drawn[r] > 0)
            width = min(len(present), max(MIN_SIZES, -(-len(present) // 2)))
            best = int(np.argmin(mean[r, present]))
            start = int(np.clip(best - width // 2, 0, len(present) - width))
            keep = np.isin(size_of, present[start:start + width])
            out[r, idx[keep]] = W[r, idx[keep]]
    return out


class SparsityVertex(Law):
    """Nonparametric optimal sparsity under plenty and scarce data (see the module docstring).

    Needs runs at 2+ unique-token limits U (the largest is "plenty", the smallest "scarce"), 2+ sparsities and
    3+ distinct active sizes per (U, C, S) curve; C is the ``budget`` column (else ``flops`` grouped within
    1 + ``rtol``). After ``fit``: ``params_``/``ci_`` hold N_star, L_star per (U, C, S), S_star per (U, C),
    S_star_difference and N_star_ratio (scarce over plenty) per C, and the unlabelled S_star_plenty,
    S_star_scarce, S_star_difference of the largest budget; ``vertices_`` and ``s_star_`` are the same as
    tables (for figures), ``verdict_`` the one-line answer at the largest budget.
    """

    name = "SparsityVertex"
    title = "optimal sparsity under plenty and scarce data (isoFLOP vertices)"
    uses_sparsity = True
    uses_unique_tokens = True
    optimum_returns = ("C", "S_star_plenty", "S_star_scarce", "S_star_difference")

    def __init__(self, *, rtol: float = 0.1, bootstrap: int = 0, seed: int = 0, level: float = 0.95):
        super().__init__(bootstrap=bootstrap, seed=seed, level=level)
        self.rtol = rtol
        self.vertices_ = pd.DataFrame()
        self.s_star_ = pd.DataFrame()
        self.verdict_ = ""

    # ------------------------------------------------------------------------------------------------ fit

    def fit(self, frame: pd.DataFrame) -> SparsityVertex:
        self._reset()
        data = self._data(frame)
        self.n_points_ = data["n"]
        R = max(self.bootstrap, 0)
        W = np.ones((1, data["n"]))
        if R:
            W = np.vstack([W, curve_resamples(R, data["runs"], data["cell"], data["log_n"], self.seed)])
        W = near_minimum(W, data["log_n"], data["loss"], data["cell"])
        par = _parabolas(data["log_n"], data["loss"], data["cell"], len(data["cells"]), W)
        log_n, loss = curve_minima(par)
        coef, v = par["coef"][0, data["cell"]], data["log_n"] - par["center"][data["cell"]]
        self.objective_ = float(np.nansum(W[0] * (data["loss"] - coef[:, 0] - coef[:, 1] * v - coef[:, 2] * v * v)
                                          ** 2))
        self._check_curves(par)
        samples = self._quantities(data, log_n, loss)
        self.params_ = {k: float(v) for k, v in samples.iloc[0].items() if np.isfinite(v)}
        if R:
            draws = samples.iloc[1:].reset_index(drop=True)
            self.bootstrap_ = draws
            self.ci_ = percentile_intervals(draws, self.level)
            self.notes_.append(f"intervals: {self.level:.0%} bootstrap percentile over runs ({R} resamples, runs "
                               f"drawn within each (U, C, S) curve, redrawn until it has {MIN_SIZES} sizes)")
        else:
            self.notes_.append("no intervals without bootstrap: no verdict")
        self.vertices_, self.s_star_ = self._tables(data, par)
        self.verdict_ = self._verdict(data)
        self.notes_ = [*self._edge_notes(data), *self.notes_, *self._answer_lines(data), self.verdict_]
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Not a loss model: the vertices are the answer (``vertices_``)."""
        raise FitError(f"{self.name} predicts no losses; read vertices_ and s_star_")

    @classmethod
    def reported(cls, points: pd.DataFrame) -> bool:
        """On sweeps with runs at 2 or more unique-token limits."""
        return points["unique_tokens"].nunique() > 1

    def _optimum(self, C: float, params: dict[str, float], **limits: Any) -> dict[str, float]:
        """S* under plenty and scarce data and their difference at the fitted budget nearest C."""
        p = params
        budget = self._budgets[np.argmin(np.abs(np.log(self._budgets / C)))]
        plenty, scarce = self._levels[-1], self._levels[0]
        return {"C": float(budget),
                "S_star_plenty": p.get(key("S_star", plenty, budget), np.nan),
                "S_star_scarce": p.get(key("S_star", scarce, budget), np.nan),
                "S_star_difference": p.get(key("S_star_difference", C=budget), np.nan)}

    # ------------------------------------------------------------------------------------------------ steps

    def _data(self, frame: pd.DataFrame) -> dict[str, Any]:
        budget_col = "budget" if "budget" in frame else "flops"
        cols = _columns(frame, self.name, ["active_params", "loss", "sparsity", "unique_tokens", budget_col],
                        positive=["active_params", "loss", "unique_tokens", budget_col])
        if ((cols["sparsity"] < 0) | (cols["sparsity"] >= 1)).any():
            raise FitError(f"{self.name}: sparsity must be in [0, 1)")
        budgets = budget_groups(frame, self.rtol)
        levels = np.unique(cols["unique_tokens"])
        if len(levels) < 2:
            raise FitError(f"{self.name} compares plenty and scarce data and needs runs at 2 or more unique-token "
                           f"limits U; all {len(frame)} runs have U = {num(levels[0])} (give unique_tokens as a "
                           "list in the sweep file)")
        sparsities = np.unique(cols["sparsity"])
        if len(sparsities) < 2:
            raise FitError(f"{self.name} needs runs at 2 or more sparsities; all runs have S = {sparsities[0]:g}")
        index = pd.MultiIndex.from_arrays([cols["unique_tokens"], budgets, cols["sparsity"]], names=["U", "C", "S"])
        code, cells = pd.factorize(index, sort=True)
        cells = cells.to_frame(index=False, name=["U", "C", "S"])
        log_n = np.log10(cols["active_params"])
        cells["sizes"] = [len(np.unique(log_n[code == g])) for g in range(len(cells))]
        cells["runs"] = np.bincount(code, minlength=len(cells))
        few = cells[cells["sizes"] < MIN_SIZES]
        if len(few):
            r = few.iloc[0]
            raise FitError(f"{self.name}: the curve at S = {r.S:g}, U = {num(r.U)}, C = {num(r.C)} has "
                           f"{int(r.sizes)} distinct active size(s); an isoFLOP vertex needs {MIN_SIZES} or more "
                           f"({len(few)} curve(s) short: add sizes or drop those runs)")
        runs = (frame["run_id"].astype(str).to_numpy(object) if "run_id" in frame
                else np.array([f"row {i}" for i in range(len(frame))], dtype=object))
        self._levels, self._budgets = levels, np.unique(budgets)
        return {"n": len(frame), "cell": code, "cells": cells, "log_n": log_n, "loss": cols["loss"],
                "runs": runs, "levels": levels, "budgets": self._budgets, "sparsities": sparsities}

    def _check_curves(self, par: dict) -> None:
        """No curve with an interior minimum is bad input (the sizes miss every optimum)."""
        inside = par["in_range"][0]
        if not inside.any():
            raise FitError(f"{self.name}: none of the {len(inside)} isoFLOP curves has an interior minimum (each "
                           "is monotone in N or opens downwards over its sizes): the sizes miss the optima; "
                           "widen sizes.span or move sizes.tokens_per_param")

    def _quantities(self, data: dict, log_n: np.ndarray, loss: np.ndarray) -> pd.DataFrame:
        """Every reported quantity per resample (row 0: the point fit), (R + 1) rows."""
        cells, out = data["cells"], {}
        for g, c in cells.iterrows():
            out[key("N_star", c.U, c.C, c.S)] = 10 ** log_n[:, g]
            out[key("L_star", c.U, c.C, c.S)] = loss[:, g]
        stars = {}
        for (U, C), group in cells.groupby(["U", "C"]):
            x = -np.log1p(-group["S"].to_numpy(float))  # ln(E/k)
            if len(group) < 2:
                continue
            stars[U, C] = -np.expm1(-refined_argmin(x, loss[:, group.index.to_numpy()]))
            out[key("S_star", U, C)] = stars[U, C]
        plenty, scarce = data["levels"][-1], data["levels"][0]
        lookup = {(c.U, c.C, c.S): g for g, c in cells.iterrows()}
        for C in data["budgets"]:
            if (plenty, C) in stars and (scarce, C) in stars:
                out[key("S_star_difference", C=C)] = stars[scarce, C] - stars[plenty, C]
            for S in data["sparsities"]:
                if (plenty, C, S) in lookup and (scarce, C, S) in lookup:
                    out[key("N_star_ratio", C=C, S=S)] = 10 ** (log_n[:, lookup[scarce, C, S]]
                                                               - log_n[:, lookup[plenty, C, S]])
        top = data["budgets"][-1]
        for name, value in (("S_star_plenty", out.get(key("S_star", plenty, top))),
                            ("S_star_scarce", out.get(key("S_star", scarce, top))),
                            ("S_star_difference", out.get(key("S_star_difference", C=top)))):
            if value is not None:
                out[name] = value
        return pd.DataFrame(out)

    def _interval(self, name: str) -> tuple[float, float]:
        return self.ci_.get(name, (math.nan, math.nan))

    def _tables(self, data: dict, par: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
        rows = []
        plenty, scarce = data["levels"][-1], data["levels"][0]
        for g, c in data["cells"].iterrows():
            n_key, l_key = key("N_star", c.U, c.C, c.S), key("L_star", c.U, c.C, c.S)
            rows.append({"unique_tokens": c.U, "budget": c.C, "sparsity": c.S, "sizes": c.sizes, "runs": c.runs,
                         "regime": "plenty" if c.U == plenty else "scarce" if c.U == scarce else "between",
                         "n_star": self.params_.get(n_key, np.nan), "n_lo": self._interval(n_key)[0],
                         "n_hi": self._interval(n_key)[1], "loss_star": self.params_.get(l_key, np.nan),
                         "loss_lo": self._interval(l_key)[0], "loss_hi": self._interval(l_key)[1],
                         "in_range": bool(par["in_range"][0, g]),
                         # the fitted parabola (in log10 N about ``center``) and the sizes it was fitted to
                         **dict(zip(("c0", "c1", "c2"), par["coef"][0, g], strict=True)),
                         "center": par["center"][g], "fit_lo": par["lo"][0, g], "fit_hi": par["hi"][0, g]})
        stars = []
        s_min, s_max = data["sparsities"].min(), data["sparsities"].max()
        for U, C in data["cells"][["U", "C"]].drop_duplicates().itertuples(index=False):
            name = key("S_star", U, C)
            if name not in self.params_:
                continue
            value = self.params_[name]
            lo, hi = self._interval(name)
            draws = self.bootstrap_[name].dropna() if self.bootstrap_ is not None else pd.Series([value])
            stars.append({"unique_tokens": U, "budget": C, "S_star": value, "S_lo": lo, "S_hi": hi,
                          "regime": "plenty" if U == plenty else "scarce" if U == scarce else "between",
                          "at_sparsest": float(np.isclose(draws, s_max).mean()),
                          "at_densest": float(np.isclose(draws, s_min).mean())})
        return pd.DataFrame(rows), pd.DataFrame(stars)

    # ------------------------------------------------------------------------------------------------ words

    def _edge_notes(self, data: dict) -> list[str]:
        notes = [f"curve at S = {r.sparsity:g}, U = {num(r.unique_tokens)}, C = {num(r.budget)} has no interior "
                 "minimum over its sizes: its L* is the lower end (an upper bound), N* at the edge"
                 for r in self.vertices_[~self.vertices_["in_range"]].itertuples()]
        s_max = data["sparsities"].max()
        for r in self.s_star_.itertuples():
            if r.S_star >= s_max - 1e-12 or r.at_sparsest >= 0.5:
                notes.append(f"S* at U = {num(r.unique_tokens)}, C = {num(r.budget)} sits at the sparsest sampled "
                             f"S = {s_max:g} ({r.at_sparsest:.0%} of resamples): sparser models might be better "
                             "still; the interval is clipped there")
            elif r.S_star <= data["sparsities"].min() + 1e-12:
                notes.append(f"S* at U = {num(r.unique_tokens)}, C = {num(r.budget)} is the densest sampled "
                             f"(S = {data['sparsities'].min():g})")
        return notes

    def _answer_lines(self, data: dict) -> list[str]:
        """Per U at the largest budget: S* with its interval and L* per sparsity."""
        top = data["budgets"][-1]
        lines = []
        for U in data["levels"][::-1]:
            name = key("S_star", U, top)
            if name not in self.params_:
                continue
            lo, hi = self._interval(name)
            cells = self.vertices_[(self.vertices_["unique_tokens"] == U) & (self.vertices_["budget"] == top)]
            losses = ", ".join(f"S={r.sparsity:g} {r.loss_star:.4g}"
                               + (f" [{r.loss_lo:.4g}, {r.loss_hi:.4g}]" if np.isfinite(r.loss_lo) else "")
                               for r in cells.itertuples())
            interval = f" ({self.level:.0%} CI {lo:.3g}–{hi:.3g})" if np.isfinite(lo) else ""
            lines.append(f"U = {num(U)}, C = {num(top)}: S* = {self.params_[name]:.3g}{interval}; L* per sparsity: "
                         f"{losses}")
        return lines

    def _verdict(self, data: dict) -> str:
        """One line at the largest budget, backed by the interval of S*_scarce − S*_plenty."""
        top = data["budgets"][-1]
        name = key("S_star_difference", C=top)
        if name not in self.params_ or name not in self.ci_:
            return ("not resolved by these runs: no interval on S*_scarce − S*_plenty (fit with --bootstrap, and "
                    f"runs at every sparsity under both U at C = {num(top)})")
        value, (lo, hi) = self.params_[name], self.ci_[name]
        diff = f"S*_scarce − S*_plenty = {value:.3g} ({self.level:.0%} CI {lo:.3g}–{hi:.3g}) at C = {num(top)}"
        bare = self.vertices_[(self.vertices_["budget"] == top) & (self.vertices_["runs"] <= MIN_SIZES)]
        if len(bare):  # 3 runs on 3 sizes: every resample is the same curve, the interval has no spread to show
            return (f"not resolved by these runs: add runs at C = {num(top)} (a second seed, or more sizes) for "
                    f"the {len(bare)} curve(s) with only {MIN_SIZES} runs, whose vertices the bootstrap cannot "
                    f"vary; {diff}")
        s_min, s_max = data["sparsities"].min(), data["sparsities"].max()
        scarce = self.params_.get(key("S_star", data["levels"][0], top), math.nan)
        if hi < 0 and s_min < scarce < s_max:
            return f"interior optimum under scarce data: S*_scarce < S*_plenty (difference interval excludes 0); {diff}"
        if hi < 0:
            return f"denser optimum under scarce data: S*_scarce < S*_plenty (difference interval excludes 0); {diff}"
        if lo > 0:
            return f"sparser optimum under scarce data: S*_scarce > S*_plenty (difference interval excludes 0); {diff}"
        return f"not resolved by these runs: add runs at {self._suggest(data, top)}; {diff}"

    def _suggest(self, data: dict, top: float) -> str:
        """Where more runs would narrow the difference: the sparsities inside either S* interval, more seeds;
        sparser experts when an S* sits at the sparsest level; wider sizes for curves without a minimum."""
        parts = []
        s_max = data["sparsities"].max()
        spans = self.s_star_[self.s_star_["budget"] == top]
        if len(spans):
            lo, hi = np.nanmin(spans["S_lo"]), np.nanmax(spans["S_hi"])
            inside = data["sparsities"][(data["sparsities"] >= lo - 1e-9) & (data["sparsities"] <= hi + 1e-9)]
            if len(inside) and lo < s_max - 1e-9:  # not every S* pinned at the sparsest: seeds narrow it
                parts.append(f"C = {num(top)} with more seeds at S = {', '.join(f'{s:g}' for s in inside)} "
                             "under both U")
            if (spans["at_sparsest"] >= 0.5).any():
                parts.append(f"sparsities above S = {s_max:g} (more experts)")
        edge = self.vertices_[(self.vertices_["budget"] == top) & ~self.vertices_["in_range"]]
        if len(edge):
            parts.append("sizes beyond the sampled range at S = " + ", ".join(
                f"{r.sparsity:g} (U = {num(r.unique_tokens)})" for r in edge.itertuples()))
        return "; ".join(parts) or f"C = {num(top)} with more seeds"


LAWS["sparsity-vertex"] = SparsityVertex


# ------------------------------------------------------------------------------------ the parametric cross-check


def seed_noise(frame: pd.DataFrame) -> float | None:
    """Pooled standard deviation of the loss between seeds of the same configuration (U, budget, sparsity,
    active size); None without repeated seeds."""
    cols = [c for c in ("unique_tokens", "budget", "sparsity", "active_params") if c in frame]
    groups = frame.groupby(cols)["loss"]
    dof = (groups.count() - 1).clip(lower=0)
    if dof.sum() == 0:
        return None
    return float(math.sqrt((groups.var(ddof=1).fillna(0) * dof).sum() / dof.sum()))


def law_checks(law: Law, vertex: SparsityVertex, frame: pd.DataFrame, level: float = 0.95) -> list[str]:
    """Where the parametric sparsity law (``laws.Sparsity``, fitted) contradicts the runs it was fitted on: its
    S* at the largest budget outside the nonparametric S* interval per U with the intervals disjoint, and best
    runs of a (U, C, S) curve it misses by more than twice the measured seed noise."""
    out = []
    top = vertex._budgets[-1]
    for U in vertex._levels:
        name = key("S_star", U, top)
        if name not in vertex.params_:
            continue
        s_law = law.optimum(top, U=U)["S_star"]
        lo_law = hi_law = s_law
        if law.bootstrap_ is not None:
            draws = pd.DataFrame({"S": [law.optimum(top, U=U, params=row)["S_star"]
                                        for row in law.bootstrap_.to_dict("records")]})
            lo_law, hi_law = percentile_intervals(draws, level).get("S", (s_law, s_law))
        lo, hi = vertex.ci_.get(name, (vertex.params_[name],) * 2)
        if hi_law < lo - 1e-9 or lo_law > hi + 1e-9:
            out.append(f"the sparsity law's S* = {s_law:.3g} ({lo_law:.3g}–{hi_law:.3g}) at U = {num(U)}, "
                       f"C = {num(top)} disagrees with the isoFLOP vertices' S* = {vertex.params_[name]:.3g} "
                       f"({lo:.3g}–{hi:.3g}): trust the vertices")
    noise = seed_noise(frame)
    if noise is None:
        return [*out, "seed noise unmeasured (no configuration run at 2+ seeds): the law's misses of the best runs "
                "were not checked"]
    rows = frame.copy()
    rows["budget"] = budget_groups(rows)
    best = rows.loc[rows.groupby(["unique_tokens", "budget", "sparsity"])["loss"].idxmin()]
    miss = law.predict(best) - best["loss"].to_numpy(float)
    bad = best.assign(miss=miss)[np.abs(miss) > 2 * noise]
    if len(bad):
        worst = bad.loc[bad["miss"].abs().idxmax()]
        out.append(f"the sparsity law misses the best run of {len(bad)} of {len(best)} (U, C, S) curves by more "
                   f"than twice the seed noise ({2 * noise:.3g} nats), worst {worst['miss']:+.3g} at S = "
                   f"{worst['sparsity']:g}, U = {num(worst['unique_tokens'])}, C = {num(worst['budget'])}: its S* "
                   "is not the answer")
    return out
