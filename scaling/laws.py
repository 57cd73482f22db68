"""Scaling laws and the fitting engine.

The laws, each a small estimator with the same shape (``Law``): ``Law(options).fit(frame)`` returns the law with
``params_`` (name → value), ``ci_`` (name → (lo, hi)), ``objective_``, ``n_points_``, ``notes_`` and
``bootstrap_`` (the bootstrap samples, or None); ``predict(frame)`` gives the loss and ``optimum(C, **limits)``
the compute-optimal allocation. ``LAWS`` (command name → class) is the one list of them: the command's choices,
the fitting front end and the report read it and each class's declarations. ``fit_law`` wraps a law for the CLI
and the report as one JSON-serialisable dict, ``result_rows`` turns that into the rows everything shows and stores.

Input columns (each law uses only some): ``params`` (total N), ``active_params``, ``tokens`` (D),
``unique_tokens`` (U), ``sparsity`` (S = (E − k)/E, 0 for dense), ``flops`` (C), ``budget`` (optional: the
planned budget, used instead of grouping ``flops``), ``loss``, ``run_id`` (the bootstrap unit).

The parametric laws are fitted the way Hoffmann et al. (2022) and Besiroglu et al. (Epoch AI, 2024) fit
Chinchilla's approach 3: log L̂ = LSE(terms), each term the log of one additive part of the loss; objective =
SUM over runs of Huber_δ(log L̂ − log L), δ = 1e-3; a local minimisation from each start of a grid, the best
kept (``scaling.solve``). Laws whose log-terms are linear in the parameters (Chinchilla, also as the base
stage of DataConstrained) run by damped Newton with analytic Hessians; the others by L-BFGS, as Hoffmann et al.
did.
"""

from __future__ import annotations

import abc
import copy
import itertools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from scaling.bootstrap import percentile_intervals, resample_weights
from scaling.solve import HUBER_DELTA, LinearTerms, LogSumObjective, Solution, Terms, solve

HOFFMANN_GRID = {"a": np.arange(0, 30, 5.0), "b": np.arange(0, 30, 5.0), "e": np.arange(-1, 1.5, 0.5),
                 "alpha": np.arange(0, 2.5, 0.5), "beta": np.arange(0, 2.5, 0.5)}
"""Hoffmann et al.'s (2022) start grid for approach 3 (4,500 starts), as in Epoch AI's replication."""
R_STAR_GRID = (1.0, 5.0, 15.0, 50.0, 200.0)
R_STAR_BOUNDS = (0.01, 1e4)
MUENNIGHOFF_R_D_STAR = 15.388
"""R_D* of Muennighoff et al. (2023), fitted on their 182 C4 runs: where ``Sparsity`` pins it."""
SPARSITY_GRID = {"log_e": (-0.5, 0.5), "log_a": (5.0, 15.0), "alpha": (0.3, 0.8), "log_b": (5.0, 15.0),
                 "beta": (0.3, 0.8), "log_c": (-5.0, 0.0), "lambda": (-0.5, 0.5), "log_d": (5.0, 15.0),
                 "delta": (0.0, 1.0), "gamma": (0.3, 0.8)}
"""Two values per parameter of Abnar et al.'s (2025) Eq. 6 in log-space form (1,024 starts)."""


class FitError(ValueError):
    """A law cannot be fitted to the data given; the message says what is missing."""


# ---------------------------------------------------------------------------------------- input


def _columns(frame: pd.DataFrame, law: str, names: Sequence[str], positive: Sequence[str] = ()) -> dict:
    """The named columns as float arrays; a missing column, a NaN/inf value, or a non-positive value where a
    logarithm is taken is a FitError."""
    missing = [c for c in names if c not in frame]
    if missing:
        raise FitError(f"{law} needs column(s) {', '.join(missing)}; "
                       f"the data has {', '.join(map(str, frame.columns))}")
    out = {c: pd.to_numeric(frame[c], errors="coerce").to_numpy(float) for c in names}
    bad = ~np.all([np.isfinite(out[c]) for c in names], axis=0)
    if bad.any():
        raise FitError(f"{law}: {bad.sum()} row(s) have NaN or infinite values in {', '.join(names)} "
                       f"(first at index {frame.index[bad][0]!r}); drop or fix them")
    for c in positive:
        if (out[c] <= 0).any():
            raise FitError(f"{law}: column {c} must be positive (it is logged); "
                           f"{(out[c] <= 0).sum()} row(s) are not")
    return out


def budget_groups(frame: pd.DataFrame, rtol: float = 0.1) -> np.ndarray:
    """Each row's budget: the ``budget`` column when present, else ``flops`` grouped (sorted FLOPs within a
    factor 1 + rtol of their group's smallest are one budget, labelled by the group's median FLOPs)."""
    if "budget" in frame:
        return frame["budget"].to_numpy(float)
    flops = frame["flops"].to_numpy(float)
    order = np.argsort(flops)
    group = np.zeros(len(flops), int)
    start = flops[order[0]] if len(flops) else 0.0
    for rank, i in enumerate(order[1:], 1):
        new = flops[i] > start * (1 + rtol)
        group[rank] = group[rank - 1] + new
        start = flops[i] if new else start
    labels = np.empty(len(flops))
    for g in np.unique(group):
        members = order[group == g]
        labels[members] = np.median(flops[members])
    return labels


def _label(sparsity: float) -> str:
    return f"S{sparsity:g}"



def _effective(log_unique: np.ndarray, repeats: np.ndarray, log_r_star: np.ndarray) -> tuple[np.ndarray, ...]:
    """Muennighoff et al. (2023): X′ = U + U·R*·(1 − exp(−R/R*)) as log X′, with its derivatives
    ∂log X′/∂log R* and ∂log X′/∂R."""
    r_star = np.exp(log_r_star)[:, None]
    x = repeats / r_star
    decay = np.exp(-x)
    gained = -np.expm1(-x)
    denom = 1 + r_star * gained
    return log_unique + np.log(denom), r_star * (gained - x * decay) / denom, decay / denom


# ---------------------------------------------------------------------------------------- base classes


class Law(abc.ABC):
    """A scaling law: ``fit(frame)`` returns the law fitted, ``predict(frame)`` its loss per row (a FitError before
    ``fit``), ``optimum(C, **limits)`` the compute-optimal answer at budget C. The class attributes say what the
    command (``--law`` choices, ``--freeze``, ``--sparsity``), the fitting front end and the report need to know,
    so that a new law is one subclass plus one line in ``LAWS``.
    """

    name: ClassVar[str]
    """The law's name in messages (``LAWS`` holds the command's name for it)."""
    title: ClassVar[str]
    """What the report calls it (the paper it follows)."""
    uses_sparsity: ClassVar[bool] = False
    """Whether the law models sparsity; if not it fits one sparsity level at a time (dense and MoE runs are
    different populations), and the report fits it per level."""
    uses_unique_tokens: ClassVar[bool] = False
    """Whether the law models the unique-token limit U; if not, the report fits it on the sweep's plenty runs."""
    freezable: ClassVar[tuple[str, ...]] = ()
    """The parameters ``--freeze NAME=VALUE`` can hold (``freeze_options`` maps them to constructor options)."""
    limits: ClassVar[tuple[str, ...]] = ()
    """The keyword limits ``optimum`` takes besides C (e.g. U, the unique-token limit)."""
    optimum_returns: ClassVar[tuple[str, ...]] = ()
    """The keys ``optimum``'s answer may have ({S} stands for a sparsity label, e.g. loss_S0.5; without a U limit
    a law of U leaves out U and epochs). ``optimum`` checks every answer against them."""
    report_runs: ClassVar[str | None] = "default"
    """Which runs the report fits it on: "default" (each sparsity level, or all runs for a law of sparsity),
    "dense" (the dense runs), or None (not in the report)."""

    def __init__(self, *, bootstrap: int = 0, seed: int = 0, level: float = 0.95):
        self.bootstrap, self.seed, self.level = int(bootstrap), seed, level
        self._reset()

    @abc.abstractmethod
    def fit(self, frame: pd.DataFrame) -> Law:
        """Fit the law to the runs (one per row) and return it."""

    @abc.abstractmethod
    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Predicted loss per row (call ``self._check_fitted()`` first)."""

    def optimum(self, C: float, *, params: dict[str, float] | None = None, **limits: Any) -> dict[str, float]:
        """The compute-optimal answer at budget C (keys from ``optimum_returns``) under the fitted parameters, or
        under ``params`` (a saved fit's, a bootstrap resample's), within ``limits`` (names: ``limits``)."""
        unknown = sorted(set(limits) - set(self.limits))
        if unknown:
            takes = f"it takes {', '.join(self.limits)}" if self.limits else "it takes none"
            raise FitError(f"{self.name}'s optimum has no limit {', '.join(unknown)} ({takes})")
        if params is None:
            self._check_fitted()
        answer = self._optimum(C, self.params_ if params is None else params, **limits)
        declared = [re.compile(re.escape(key).replace(re.escape("{S}"), ".+")) for key in self.optimum_returns]
        undeclared = [key for key in answer if not any(p.fullmatch(key) for p in declared)]
        if undeclared:  # a law's own mistake, not the user's
            raise TypeError(f"{self.name}.optimum returned {undeclared}, not declared in its optimum_returns")
        return answer

    @abc.abstractmethod
    def _optimum(self, C: float, params: dict[str, float], **limits: Any) -> dict[str, float]:
        """``optimum`` under ``params``, the limits checked."""

    @classmethod
    def formula(cls, params: dict[str, float], digits: int = 6) -> str | None:
        """The law as text with its fitted numbers in (``digits`` significant digits), so that a reader can
        recompute a prediction by hand; None for a law that is no closed form of N, D, ..."""
        return None

    @classmethod
    def freeze_options(cls, values: dict[str, float]) -> dict[str, Any]:
        """``--freeze NAME=VALUE`` pairs as constructor options (a FitError naming a parameter it cannot hold)."""
        if not values:
            return {}
        if not cls.freezable:
            raise FitError(f"the {cls.name} law has no parameters to freeze")
        unknown = sorted(set(values) - set(cls.freezable))
        if unknown:
            raise FitError(f"{cls.name} has no parameter(s) {', '.join(unknown)} to freeze; it can freeze "
                           f"{', '.join(cls.freezable)} only")
        return {"frozen": dict(values)}

    @classmethod
    def reported(cls, points: pd.DataFrame) -> bool:
        """Whether the report fits this law to a sweep's points (e.g. only when some run repeats data)."""
        return cls.report_runs is not None

    def tables(self) -> dict[str, pd.DataFrame]:
        """Per-row results beside the parameters (e.g. isoFLOP vertices), named; ``summarize`` adds them."""
        return {}

    def optimum_notes(self, ci: dict[str, tuple[float, float]]) -> list[str]:
        """What a reader must know about the intervals of the optimum (``summarize`` adds them to the notes)."""
        return []

    def _check_fitted(self) -> None:
        if not self.params_:
            raise FitError(f"{self.name} is not fitted yet: call fit first")

    def _reset(self) -> None:
        """Forget a previous fit (called first by every ``fit``)."""
        self.params_: dict[str, float] = {}
        self.ci_: dict[str, tuple[float, float]] = {}
        self.notes_: list[str] = []
        self.objective_ = math.nan
        self.n_points_ = 0
        self.bootstrap_: pd.DataFrame | None = None

    def _run_bootstrap(self, frame: pd.DataFrame, refit: Callable[[np.ndarray], pd.DataFrame],
                       strata: np.ndarray | None = None) -> None:
        """Refit ``bootstrap`` resamples of the runs (``refit`` maps the (R, n) draw counts to one row of
        parameters per resample, NaN where a refit failed) and set percentile intervals."""
        if self.bootstrap <= 0:
            return
        runs = np.array([f"row {i}" for i in range(len(frame))], dtype=object)
        if "run_id" in frame:
            ids = frame["run_id"].to_numpy(object)
            runs[pd.notna(ids)] = ["run " + str(r) for r in ids[pd.notna(ids)]]
        samples = refit(resample_weights(self.bootstrap, runs, self.seed, strata))
        failed = ~np.isfinite(samples.to_numpy(float)).all(axis=1)
        self.bootstrap_ = samples[~failed].reset_index(drop=True)
        if failed.any():
            self.notes_.append(f"{failed.sum()} of {self.bootstrap} bootstrap resamples could not be fitted "
                               "and were left out of the intervals")
        if len(self.bootstrap_) < 2:
            raise FitError(f"{self.name}: fewer than 2 of {self.bootstrap} bootstrap resamples could be "
                           "fitted")
        self.ci_.update(percentile_intervals(self.bootstrap_, self.level))
        self.notes_.append(f"intervals: {self.level:.0%} bootstrap percentile over runs "
                           f"({len(self.bootstrap_)} resamples)")


class ParametricLaw(Law):
    """A law of the form log L̂ = LSE(terms), fitted from a grid of starts by ``scaling.solve``.

    A subclass declares ``spec``: (internal name, public name, internal = log(public)) per parameter, its
    ``default_grid`` of starts (internal names) and its ``floor``, and defines ``_data(frame, with_loss)`` (the
    columns it reads, with ``n`` and, with the loss, ``y`` = log L), ``_terms(data)`` and ``_optimum``.
    ``frozen`` (public names) fixes parameters; ``grid`` (internal names → values) overrides the start grid.
    """

    spec: ClassVar[tuple[tuple[str, str, bool], ...]]
    default_grid: ClassVar[dict[str, Sequence[float]]]
    floor: ClassVar[str]
    """The parameter that is the irreducible loss (what an extrapolation check measures errors against)."""

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.freezable = tuple(p for _, p, _ in cls.spec)

    def __init__(self, *, frozen: dict[str, float] | None = None,
                 grid: dict[str, Sequence[float]] | None = None, huber_delta: float = HUBER_DELTA,
                 bootstrap: int = 0, seed: int = 0, level: float = 0.95):
        super().__init__(bootstrap=bootstrap, seed=seed, level=level)
        self.frozen = dict(frozen or {})
        unknown = set(self.frozen) - {p for _, p, _ in self.spec}
        if unknown:
            raise FitError(f"{self.name} has no parameter(s) {', '.join(sorted(unknown))}; "
                           f"its parameters are {', '.join(p for _, p, _ in self.spec)}")
        self.grid = {**self.default_grid, **(grid or {})}
        self.huber_delta = huber_delta
        self._theta: np.ndarray | None = None

    def fit(self, frame: pd.DataFrame) -> ParametricLaw:
        """Best of the start grid (polished), then bootstrap refits warm-started from its distinct basins."""
        self._reset()
        data = self._data(frame, with_loss=True)
        self._check_points(data["n"])
        self._validate(data)
        self.n_points_ = data["n"]
        free = self._free()
        sol = solve(self._terms(data), data["y"], self._grid_starts(), free, delta=self.huber_delta,
                    polish=True)
        self._require_converged(sol)
        self._set_params(sol.x[0])
        self.objective_ = float(sol.fun[0])
        if not self.bootstrap:
            self.notes_.append("no intervals without bootstrap")
        self._run_bootstrap(frame, lambda W: self._samples(solve(
            self._terms(data), data["y"], sol.candidates, free, weights=W, delta=self.huber_delta,
            precise=True).x))
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Predicted loss per row."""
        self._check_fitted()
        return self._predict(self._theta, self._data(frame, with_loss=False))

    def predict_with(self, frame: pd.DataFrame, params: dict[str, float]) -> np.ndarray:
        """Predicted loss per row under given values of the parameters (public names: a saved fit's, or a
        bootstrap resample's); needs no fit."""
        return self._predict(self._internal(params), self._data(frame, with_loss=False))

    # names and transforms
    def _position(self, names: Sequence[str]) -> np.ndarray:
        """Where the parameters ``names`` (public) sit in θ, in θ's order."""
        return np.flatnonzero([p in names for _, p, _ in self.spec])

    def _named(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        """The columns of a batch θ (b, p) by internal name, each (b, 1)."""
        return {n: theta[:, j:j + 1] for j, (n, _, _) in enumerate(self.spec)}

    def _by_parameter(self, jac: dict[str, list[tuple[int, Any]]]) -> list[list[tuple[int, Any]]]:
        """Derivative pairs given by internal name, in θ's order (``Terms``' layout)."""
        return [jac.get(n, []) for n, _, _ in self.spec]

    def _internal(self, public: dict[str, float]) -> np.ndarray:
        with np.errstate(divide="ignore"):  # a coefficient that underflowed to 0: a term of −inf, no term
            return np.array([np.log(public[p]) if is_log else public[p] for _, p, is_log in self.spec], float)

    def _public(self, theta: np.ndarray) -> dict[str, float]:
        with np.errstate(over="ignore"):  # a coefficient beyond float range is inf: a failed (dropped) refit
            return {p: float(np.exp(v) if is_log else v)
                    for (_, p, is_log), v in zip(self.spec, theta, strict=True)}

    def _free(self, names: Sequence[str] | None = None) -> np.ndarray:
        """Free coordinates: not frozen, and among ``names`` (public) when given."""
        return np.array([p not in self.frozen and (names is None or p in names) for _, p, _ in self.spec])

    def _grid_starts(self, names: Sequence[str] | None = None) -> np.ndarray:
        """Cartesian product of the start grid over the free coordinates among ``names``; the others at their
        frozen values (0 when not frozen)."""
        free = self._free(names)
        axes = [np.asarray(self.grid[n], float) if free[i]
                else [math.log(self.frozen[p]) if is_log else self.frozen[p]] if p in self.frozen else [0.0]
                for i, (n, p, is_log) in enumerate(self.spec)]
        return np.stack([a.ravel() for a in np.meshgrid(*axes, indexing="ij")], axis=1)  # itertools.product order

    def _set_params(self, theta: np.ndarray) -> None:
        self._theta = theta
        self.params_ = {**self._public(theta), **self._derived(self._public(theta))}
        if self.frozen:
            self.notes_.append("frozen: " + ", ".join(f"{p} = {v:g}" for p, v in self.frozen.items()))

    def _derived(self, params: dict[str, float]) -> dict[str, float]:
        return {}

    def _samples(self, thetas: np.ndarray) -> pd.DataFrame:
        rows = [{**self._public(t), **self._derived(self._public(t))} if np.isfinite(t).all() else {}
                for t in thetas]
        return pd.DataFrame(rows, columns=list(self.params_))

    def _check_points(self, n: int) -> None:
        free = int(self._free().sum())
        if n <= free:
            raise FitError(f"{self.name} needs more runs than free parameters ({free}); got {n}")

    def _validate(self, data: dict) -> None:
        """Law-specific checks of the data (raise FitError)."""

    def _require_converged(self, sol: Solution) -> None:
        if not sol.converged[0]:
            raise FitError(f"{self.name} fit did not converge (best objective {sol.fun[0]:.4g}); check the "
                           "data or widen the start grid")

    def _predict(self, theta: np.ndarray, data: dict) -> np.ndarray:
        objective = LogSumObjective(self._terms(data), np.zeros(data["n"]))
        with np.errstate(all="ignore"):
            return np.exp(objective.log_prediction(theta[None])[0])

    def _data(self, frame: pd.DataFrame, with_loss: bool) -> dict:
        raise NotImplementedError

    def _terms(self, data: dict) -> Terms:
        raise NotImplementedError


def _allocation_search(loss: Callable[[np.ndarray, np.ndarray], np.ndarray], C: float,
                       sparsities: np.ndarray, refine_s: bool,
                       n_range: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(S, N_active, loss) minimising ``loss(n_active, s)`` over N_active (D = C/(6·N_active); within
    ``n_range``, by default from 1e-8 to 1e8 tokens per parameter) and over ``sparsities`` (refined between
    grid neighbours with ``refine_s``): nested log grids, each zooming onto the previous best cell."""
    if n_range is None:
        bounds = (-4 * math.log(10), 4 * math.log(10))
    else:
        bounds = (math.log(n_range[0] / math.sqrt(C / 6)), math.log(n_range[1] / math.sqrt(C / 6)))

    def best_n(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        center = math.log(math.sqrt(C / 6))
        lo, hi = np.full(len(s), bounds[0]), np.full(len(s), bounds[1])
        for _ in range(4):
            log_n = center + lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, 65)
            with np.errstate(all="ignore"):
                values = loss(np.exp(log_n), np.broadcast_to(s[:, None], log_n.shape))
            values = np.where(np.isfinite(values), values, np.inf)
            i = values.argmin(axis=1)
            step = (hi - lo) / 64
            mid = lo + i * step
            lo, hi = np.maximum(mid - step, bounds[0]), np.minimum(mid + step, bounds[1])
        return np.exp(center + mid), values[np.arange(len(s)), i]

    n_best, l_best = best_n(sparsities)
    j = int(np.argmin(l_best))
    if refine_s and len(sparsities) > 1:
        fine = np.linspace(sparsities[max(j - 1, 0)], sparsities[min(j + 1, len(sparsities) - 1)], 41)
        n_fine, l_fine = best_n(fine)
        k = int(np.argmin(l_fine))
        if l_fine[k] <= l_best[j]:
            return float(fine[k]), float(n_fine[k]), float(l_fine[k])
    return float(sparsities[j]), float(n_best[j]), float(l_best[j])


# ---------------------------------------------------------------------------------------- Chinchilla


def _chinchilla_terms(log_n: np.ndarray, log_d: np.ndarray) -> LinearTerms:
    """t = (a − α·log N, b − β·log D, e) over θ = (a, b, e, α, β): linear, so fitted by Newton's method."""
    return LinearTerms(5, [(0.0, {0: 1.0, 3: -log_n}), (0.0, {1: 1.0, 4: -log_d}), (0.0, {2: 1.0})], len(log_n))


def repeats_data(points: pd.DataFrame) -> bool:
    """Whether some run saw its unique tokens more than once (epochs > 1)."""
    return bool((points["epochs"] > 1).any()) if "epochs" in points else False


def chinchilla_optimum(params: dict[str, float], C: float) -> dict[str, float]:
    """Hoffmann et al.'s (2022) closed form with C = 6ND: G = (αA/(βB))^(1/(α+β)),
    N_opt = G·(C/6)^(β/(α+β)), D_opt = (C/6)^(α/(α+β))/G, and the law's loss there."""
    A, B, E, alpha, beta = (params[k] for k in ("A", "B", "E", "alpha", "beta"))
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    n_opt = G * (C / 6) ** (beta / (alpha + beta))
    d_opt = (C / 6) ** (alpha / (alpha + beta)) / G
    return {"C": float(C), "N_opt": n_opt, "D_opt": d_opt, "loss": E + A / n_opt**alpha + B / d_opt**beta}


def _texts(params: dict[str, float], digits: int) -> dict[str, str]:
    return {name: f"{value:.{digits}g}" for name, value in params.items()}


def _effective_data_text(v: dict[str, str]) -> str:
    """Muennighoff et al.'s effective data D′ as text, with R_D* from ``v``."""
    return (f"U_D = min(U, D), R_D = D/U_D − 1, D′ = U_D + U_D·{v.get('R_D_star')}·(1 − exp(−R_D/"
            f"{v.get('R_D_star')}))")


class Chinchilla(ParametricLaw):
    """Chinchilla approach 3 (Hoffmann et al. 2022): L = E + A/N^α + B/D^β, fitted as Epoch AI (Besiroglu et
    al. 2024) refit it: LSE form, summed Huber (δ = 1e-3) of log residuals, best of the 4,500-start grid.

    ``n_col``: the N column (``params``, total parameters, by default). Derived: a = β/(α+β) (N_opt ∝ C^a) and
    b = α/(α+β) (D_opt ∝ C^b).
    """

    name = "Chinchilla"
    title = "Chinchilla approach 3"
    optimum_returns = ("C", "N_opt", "D_opt", "loss")
    report_runs = "dense"
    floor = "E"
    spec = (("a", "A", True), ("b", "B", True), ("e", "E", True), ("alpha", "alpha", False),
            ("beta", "beta", False))
    default_grid = HOFFMANN_GRID

    @classmethod
    def formula(cls, params: dict[str, float], digits: int = 6) -> str:
        v = _texts(params, digits)
        return f"L = {v['E']} + {v['A']}/N^{v['alpha']} + {v['B']}/D^{v['beta']}"

    def __init__(self, *, n_col: str = "params", **options: Any):
        super().__init__(**options)
        self.n_col = n_col

    @classmethod
    def reported(cls, points: pd.DataFrame) -> bool:
        """On dense runs that never repeat data (else the report fits ``DataConstrained``)."""
        return not repeats_data(points[points["sparsity"] == 0])

    def _optimum(self, C: float, params: dict[str, float], **limits: Any) -> dict[str, float]:
        """Compute-optimal N, D (C = 6ND) and the loss there."""
        return chinchilla_optimum(params, C)

    def _derived(self, params: dict[str, float]) -> dict[str, float]:
        total = params["alpha"] + params["beta"]
        return {"a": params["beta"] / total, "b": params["alpha"] / total}

    def _validate(self, data: dict) -> None:
        log_c = data["log_n"] + data["log_d"]  # log(C/6)
        if np.ptp(log_c) <= math.log1p(0.1):  # one budget, as ``budget_groups`` groups them
            raise FitError(f"{self.name} needs runs at 2 or more compute budgets (C = 6ND); all {data['n']} "
                           f"runs are at C = {6 * math.exp(np.median(log_c)):.3g}, where N and D move together "
                           "and the N and D terms cannot be told apart")

    def _data(self, frame: pd.DataFrame, with_loss: bool) -> dict:
        names = [self.n_col, "tokens"] + (["loss"] if with_loss else [])
        cols = _columns(frame, self.name, names, positive=names)
        data = {"n": len(frame), "log_n": np.log(cols[self.n_col]), "log_d": np.log(cols["tokens"])}
        if with_loss:
            data["y"] = np.log(cols["loss"])
        return data

    def _terms(self, data: dict) -> Terms:
        return _chinchilla_terms(data["log_n"], data["log_d"])


# ---------------------------------------------------------------------------------------- data-constrained


class DataConstrained(ParametricLaw):
    """Data-constrained scaling (Muennighoff et al. 2023): with U_D = min(U, D) unique tokens and
    R_D = D/U_D − 1 repetitions, D′ = U_D + U_D·R_D*·(1 − exp(−R_D/R_D*)); U_N = min(N, N_opt(U_D)), the
    compute-optimal N for D = U_D tokens under the base law, R_N = max(N/U_N − 1, 0),
    N′ = U_N + U_N·R_N*·(1 − exp(−R_N/R_N*)); L = E + A/N′^α + B/D′^β.

    Procedure (``procedure="auto"``): the paper's two stages when there are enough single-epoch runs (the base
    law E, A, B, α, β as a Chinchilla fit on them, then R_D*, R_N* on all runs with the base frozen), else all
    free parameters jointly (``"joint"``; ``"two-stage"`` insists). Single-epoch runs larger than optimal for
    their data have R_N > 0 under the law, so the first stage is misspecified for them (a note says how many).
    Intervals: with ``bootstrap`` > 0 bootstrap percentiles of every parameter (both stages refitted, so the
    base law's uncertainty reaches R_D*, R_N*); without, profile intervals for R_D*, R_N* (conditional on the
    base law after two stages). R* stay within ``r_bounds``; an interval over a factor 3 wide or reaching a
    bound is noted as weakly identified.
    """

    name = "DataConstrained"
    title = "data-constrained (Muennighoff et al. 2023)"
    uses_unique_tokens = True
    limits = ("U",)
    optimum_returns = ("C", "U", "N_opt", "D_opt", "epochs", "loss")
    report_runs = "dense"
    floor = "E"
    spec = Chinchilla.spec + (("log_R_D_star", "R_D_star", True), ("log_R_N_star", "R_N_star", True))
    default_grid = {**HOFFMANN_GRID, "log_R_D_star": np.log(R_STAR_GRID), "log_R_N_star": np.log(R_STAR_GRID)}
    base = ("E", "A", "B", "alpha", "beta")
    stars = ("R_D_star", "R_N_star")

    @classmethod
    def formula(cls, params: dict[str, float], digits: int = 6) -> str:
        v = _texts(params, digits)
        return (f"L = {v['E']} + {v['A']}/N′^{v['alpha']} + {v['B']}/D′^{v['beta']}; {_effective_data_text(v)}; "
                f"U_N = min(N, ({v['alpha']}·{v['A']}/({v['beta']}·{v['B']}))^(1/{v['alpha']})·U_D^({v['beta']}/"
                f"{v['alpha']})), R_N = N/U_N − 1, N′ = U_N + U_N·{v['R_N_star']}·(1 − exp(−R_N/{v['R_N_star']}))")

    def __init__(self, *, n_col: str = "params", procedure: str = "auto",
                 r_bounds: tuple[float, float] = R_STAR_BOUNDS, **options: Any):
        super().__init__(**options)
        if procedure not in ("auto", "two-stage", "joint"):
            raise FitError(f"procedure must be 'auto', 'two-stage' or 'joint', not {procedure!r}")
        self.n_col, self.procedure, self.r_bounds = n_col, procedure, r_bounds

    def fit(self, frame: pd.DataFrame) -> DataConstrained:
        self._reset()
        data = self._data(frame, with_loss=True)
        self._check_points(data["n"])
        self.n_points_ = data["n"]
        two_stage = self._two_stage(data)
        sol = self._estimate(data, two_stage)
        self._require_converged(sol)
        theta = self._clip_stars(data, sol.x[0], two_stage)
        self._set_params(theta)
        if two_stage:
            self._check_base_runs(data, theta)
        self.objective_ = self._objective(data, theta)
        if self.bootstrap:
            self._run_bootstrap(frame, lambda W: self._samples(self._clip_log_stars(
                self._estimate(data, two_stage, W, sol.candidates).x)))
        else:
            self._profiles(data, theta, two_stage)
            self.notes_.append(f"intervals: {self.level:.0%} profile likelihood for the free R* only "
                               "(bootstrap = 0)" if self.ci_ else "no intervals without bootstrap")
        for star in self.stars:
            if star in self.ci_:
                lo, hi = self.ci_[star]
                at_bound = bool(np.isclose([lo, hi], self.r_bounds, rtol=1e-6).any())
                if hi / lo > 3 or at_bound:
                    bound = " reaches the search bound" if at_bound else ""
                    self.notes_.append(f"{star} is weakly identified: {self.level:.0%} interval "
                                       f"{lo:.3g}–{hi:.3g}{bound}")
        return self

    @classmethod
    def reported(cls, points: pd.DataFrame) -> bool:
        """On dense runs of which some repeat data."""
        return repeats_data(points[points["sparsity"] == 0])

    def _optimum(self, C: float, params: dict[str, float], U: float | None = None) -> dict[str, float]:
        """Compute-optimal N, D at budget C (C = 6ND) with U unique tokens (None: the base law's closed form),
        the epochs D/U and the loss."""
        if U is None:
            return chinchilla_optimum(params, C)
        theta = self._internal(params)

        def loss(n: np.ndarray, _: np.ndarray) -> np.ndarray:
            data = self._arrays(n.ravel(), C / (6 * n.ravel()), np.full(n.size, U))
            return self._predict(theta, data).reshape(n.shape)

        _, n_opt, best = _allocation_search(loss, C, np.zeros(1), refine_s=False)
        d_opt = C / (6 * n_opt)
        return {"C": float(C), "U": float(U), "N_opt": n_opt, "D_opt": d_opt, "epochs": d_opt / U,
                "loss": best}

    # the procedure
    def _two_stage(self, data: dict) -> bool:
        free_base = [p for p in self.base if p not in self.frozen]
        free_stars = [p for p in self.stars if p not in self.frozen]
        single = data["single"]
        enough = (single.sum() >= max(10, 2 * len(free_base)) and len(np.unique(data["log_n"][single])) >= 2
                  and len(np.unique(data["log_d"][single])) >= 2)
        if self.procedure == "two-stage" and free_base and free_stars and not enough:
            raise FitError(f"{self.name}: the two-stage procedure needs at least 10 single-epoch runs of 2 "
                           f"or more sizes to fit the base law; got {single.sum()}")
        two = bool(free_base and free_stars and (self.procedure == "two-stage"
                                                 or (self.procedure == "auto" and enough)))
        if free_base and free_stars:
            self.notes_.append("two-stage fit (Muennighoff et al.): base law on the single-epoch runs, "
                               "then R_D*, R_N*" if two else "joint fit of the base law and R_D*, R_N*")
        return two

    def _estimate(self, data: dict, two_stage: bool, weights: np.ndarray | None = None,
                  warm: np.ndarray | None = None) -> Solution:
        """Point fit (``weights`` None: start grids, polished) or bootstrap refits from ``warm`` starts."""
        point = weights is None
        w = np.ones((1, data["n"])) if point else weights
        mode = {"polish": point, "precise": not point}
        chinchilla = _chinchilla_terms(data["log_n"], data["log_d"])  # θ's base columns, in Chinchilla's order
        base, stars_at = self._position(self.base), self._position(self.stars)

        def joined(base_x: np.ndarray, star_x: np.ndarray) -> np.ndarray:
            """θ from its base and R* columns (broadcast over leading axes)."""
            shape = np.broadcast_shapes(base_x.shape[:-1], star_x.shape[:-1])
            out = np.empty((*shape, len(self.spec)))
            out[..., base], out[..., stars_at] = base_x, star_x
            return out

        if two_stage:
            first = solve(chinchilla, data["y"],
                          self._grid_starts(self.base)[:, base] if point else np.unique(warm[:, base], axis=0),
                          self._free(self.base)[base], weights=w * data["single"], delta=self.huber_delta,
                          **mode)
            stars = self._grid_starts(self.stars)[:, stars_at] if point else np.unique(warm[:, stars_at], axis=0)
            starts = joined(first.x[:, None, :], np.broadcast_to(stars, (len(w), *stars.shape)))
            sol = solve(self._terms(data), data["y"], starts, self._free(self.stars), weights=w,
                        delta=self.huber_delta, **mode)
            k = max(len(first.candidates), len(sol.candidates))  # warm starts of both stages, row-aligned
            pick = lambda c: c[np.minimum(np.arange(k), len(c) - 1)]  # noqa: E731
            warm = joined(pick(first.candidates), pick(sol.candidates)[:, stars_at])
            return Solution(sol.x, sol.fun, sol.converged & first.converged, warm)
        if point and any(p not in self.frozen for p in self.base):  # the base law's basins x the R* grid
            chin = solve(chinchilla, data["y"], self._grid_starts(self.base)[:, base],
                         self._free(self.base)[base], delta=self.huber_delta, polish=True)
            stars = self._grid_starts(self.stars)[:, stars_at]
            warm = np.array([joined(b, s) for b in chin.candidates for s in stars])
        elif point:
            warm = self._grid_starts()
        return solve(self._terms(data), data["y"], warm, self._free(), weights=None if point else w,
                     delta=self.huber_delta, **mode)

    def _clip_stars(self, data: dict, theta: np.ndarray, two_stage: bool) -> np.ndarray:
        """Keep R_D*, R_N* within ``r_bounds`` (a flat objective lets them drift): clip, refit the rest."""
        clipped = self._clip_log_stars(theta[None].copy())[0]
        if np.array_equal(clipped, theta):
            return theta
        at_bound = [self.spec[j][1] for j in self._position(self.stars) if theta[j] != clipped[j]]
        free = self._free() & ~np.isin([p for _, p, _ in self.spec], at_bound)
        if two_stage:
            free[self._position(self.base)] = False
        sol = solve(self._terms(data), data["y"], clipped[None], free, delta=self.huber_delta, precise=True)
        self.notes_.append(f"{', '.join(at_bound)} at the search bound {self.r_bounds}: the objective keeps "
                           "falling beyond it")
        return sol.x[0]

    def _clip_log_stars(self, thetas: np.ndarray) -> np.ndarray:
        stars_at = self._position(self.stars)
        thetas[:, stars_at] = np.clip(thetas[:, stars_at], *np.log(self.r_bounds))
        return thetas

    def _objective(self, data: dict, theta: np.ndarray) -> float:
        objective = LogSumObjective(self._terms(data), data["y"], self.huber_delta)
        with np.errstate(all="ignore"):
            return float(objective(theta[None], np.zeros(1, int))[0][0])

    def _check_base_runs(self, data: dict, theta: np.ndarray) -> None:
        p = {n: float(v[0, 0]) for n, v in self._named(theta[None]).items()}
        a, b, alpha, beta = p["a"], p["b"], p["alpha"], p["beta"]
        log_n_opt = (math.log(alpha / beta) + a - b) / alpha + beta / alpha * data["log_u"]
        over = int((data["single"] & (data["log_n"] > log_n_opt)).sum())
        if over:
            self.notes_.append(f"{over} single-epoch runs are larger than compute-optimal for their data "
                               "(R_N > 0 under the law) yet enter the base fit as plain Chinchilla points; "
                               "procedure='joint' fits them consistently")

    def _profiles(self, data: dict, theta: np.ndarray, two_stage: bool) -> None:
        """Profile intervals for the free R*: the objective re-minimised over the other free parameters (only
        the other R* after two stages) at log-spaced offsets from the estimate, out to ``r_bounds``; the
        interval is where the robust likelihood-ratio statistic of the Huber M-estimator,
        2·Δobjective·E[ψ′]/E[ψ²] (Heritier & Ronchetti 1994), stays below χ²₁."""
        objective = LogSumObjective(self._terms(data), data["y"], self.huber_delta)
        resid = objective.log_prediction(theta[None])[0] - data["y"]
        scale = _huber_dispersion(resid, self.huber_delta)
        from scipy import stats  # imported where used (as statsmodels below): seconds a CLI error must not wait

        limit = self.objective_ + stats.chi2.ppf(self.level, 1) / 2 * scale
        offsets = np.array([0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 4.5, 6.5, 9.5, 14])
        for star in self.stars:
            if star in self.frozen:
                continue
            j = int(self._position([star])[0])
            grid = np.unique(np.clip(theta[j] + np.r_[-offsets, 0, offsets], *np.log(self.r_bounds)))
            starts = np.repeat(theta[None], len(grid), axis=0)
            starts[:, j] = grid
            free = self._free()
            free[j] = False
            if two_stage:
                free[self._position(self.base)] = False
            prof = solve(self._terms(data), data["y"], starts[:, None, :], free,
                         weights=np.ones((len(grid), data["n"])), delta=self.huber_delta, precise=True)
            values = np.where(np.isfinite(prof.fun), prof.fun, np.inf)
            center = int(np.argmin(np.abs(grid - theta[j])))
            lo, hi = (_crossing(grid, values, center, step, limit) for step in (-1, 1))
            self.ci_[star] = (math.exp(lo), math.exp(hi))

    def _data(self, frame: pd.DataFrame, with_loss: bool) -> dict:
        names = [self.n_col, "tokens", "unique_tokens"] + (["loss"] if with_loss else [])
        cols = _columns(frame, self.name, names, positive=names)
        data = self._arrays(cols[self.n_col], cols["tokens"], cols["unique_tokens"])
        if with_loss:
            data["y"] = np.log(cols["loss"])
        return data

    @staticmethod
    def _arrays(n: np.ndarray, d: np.ndarray, u: np.ndarray) -> dict:
        unique = np.minimum(u, d)
        return {"n": len(n), "log_n": np.log(n), "log_d": np.log(d), "log_u": np.log(unique),
                "repeats": d / unique - 1, "single": d <= u * (1 + 1e-9)}

    def _terms(self, data: dict) -> Terms:
        log_n, log_u, repeats = data["log_n"], data["log_u"], data["repeats"]

        def terms(theta: np.ndarray):
            p = self._named(theta)
            a, b, e, alpha, beta = p["a"], p["b"], p["e"], p["alpha"], p["beta"]
            log_d_eff, dd_star, _ = _effective(log_u, repeats, p["log_R_D_star"][:, 0])
            # U_N = min(N, N_opt(U_D)), Chinchilla's closed form solved for the N whose D_opt is U:
            # log N_opt(U) = (log α − log β + a − b)/α + (β/α)·log U
            gap = np.log(alpha) - np.log(beta) + a - b
            log_n_opt = gap / alpha + beta / alpha * log_u
            binding = log_n_opt < log_n
            log_un = np.minimum(log_n_opt, log_n)  # NaN (a rejected step) unless α, β > 0
            log_n_eff, dn_star, dn_repeat = _effective(log_un, np.exp(log_n - log_un) - 1, p["log_R_N_star"][:, 0])
            # ∂log N′/∂log U_N where U_N binds (R_N = N/U_N − 1 moves with it), times ∂log N_opt/∂(a, b, α, β)
            dn_un = np.where(binding, 1 - dn_repeat * np.exp(log_n - log_un), 0.0)
            d_opt = {"a": 1 / alpha, "b": -1 / alpha, "alpha": (1 - gap - beta * log_u) / alpha**2,
                     "beta": (log_u - 1 / beta) / alpha}
            via = {k: -alpha * dn_un * v for k, v in d_opt.items()}  # ∂t_N through U_N
            return ([a - alpha * log_n_eff, b - beta * log_d_eff, e], self._by_parameter({
                "a": [(0, 1.0), (0, via["a"])], "b": [(1, 1.0), (0, via["b"])], "e": [(2, 1.0)],
                "alpha": [(0, -log_n_eff), (0, via["alpha"])], "beta": [(1, -log_d_eff), (0, via["beta"])],
                "log_R_D_star": [(1, -beta * dd_star)], "log_R_N_star": [(0, -alpha * dn_star)]}))

        return terms


def _crossing(grid: np.ndarray, values: np.ndarray, center: int, step: int, limit: float) -> float:
    """Walking from ``center`` in direction ``step``: where the profile first exceeds ``limit`` (linear in
    log R* between grid points), or the grid's end."""
    i = center
    while 0 <= i + step < len(grid) and values[i + step] <= limit:
        i += step
    j = i + step
    if not 0 <= j < len(grid):
        return float(grid[i])
    if not np.isfinite(values[j]) or values[j] <= values[i]:
        return float(grid[j])
    return float(grid[i] + (grid[j] - grid[i]) * (limit - values[i]) / (values[j] - values[i]))


def _huber_dispersion(resid: np.ndarray, delta: float) -> float:
    """E[ψ²]/E[ψ′] of the Huber ψ = clip(r, ±δ) over the residuals, with E[ψ′] = P(|r| ≤ δ) smoothed by a
    Gaussian kernel (Silverman's bandwidth): the scale turning an objective difference into a likelihood
    ratio."""
    from scipy import stats

    spread = min(resid.std(), stats.iqr(resid) / 1.34) or resid.std() or delta
    h = 0.9 * spread * len(resid) ** -0.2
    inside = np.mean(stats.norm.cdf((delta - resid) / h) - stats.norm.cdf((-delta - resid) / h))
    return float(np.mean(np.clip(resid, -delta, delta) ** 2) / max(inside, 1e-12))


# ---------------------------------------------------------------------------------------- sparsity


def total_params_from_runs(points: pd.DataFrame) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Total params from active params N and sparsity S, as the runs' own architecture has them.

    With top-k routing the E − k idle experts hold S/(1 − S) times the active expert params, so
    total = N·(1 + φ(N)·S/(1 − S)), φ(N) the share of active params in routed experts, fitted linear in log N
    over the MoE runs (Abnar et al.'s N/(1 − S) takes φ = 1, which overstates small models' totals: their
    embeddings and attention are shared). Abnar et al.'s N/(1 − S) without MoE runs to learn φ from.
    """
    moe = points[points["sparsity"] > 0].drop_duplicates(["sparsity", "active_params"])
    if moe.empty:
        return lambda n, s: n / (1 - s)
    s = moe["sparsity"].to_numpy(float)
    share = (moe["params"] / moe["active_params"] - 1).to_numpy(float) * (1 - s) / s
    log_n = np.log(moe["active_params"].to_numpy(float))
    slope, icpt = np.polyfit(log_n, share, 1) if len(np.unique(log_n)) > 1 else (0.0, float(share.mean()))

    def total(n: np.ndarray, sparsity: np.ndarray) -> np.ndarray:
        phi = np.clip(icpt + slope * np.log(n), 0.0, 1.0)
        return n * (1 + phi * sparsity / (1 - sparsity))

    return total


def spans_epochs(frame: pd.DataFrame, runs: int = 5, factor: float = 4.0) -> tuple[float, float] | None:
    """The (fewest, most) epochs of the repeated runs (epochs = tokens/unique_tokens > 1) when at least ``runs``
    repeat data and their epochs span ``factor`` or more: enough to measure a repetition penalty; else None."""
    if not {"tokens", "unique_tokens"} <= set(frame):
        return None
    epochs = (pd.to_numeric(frame["tokens"], errors="coerce")
              / pd.to_numeric(frame["unique_tokens"], errors="coerce")).to_numpy(float)
    repeated = epochs[np.isfinite(epochs) & (epochs > 1)]
    if len(repeated) < runs or repeated.max() < factor * max(repeated.min(), 1.0):
        return None
    return float(repeated.min()), float(repeated.max())


class Sparsity(ParametricLaw):
    """Sparsity-aware law of Abnar et al. (2025), their Eq. 6:
    L(N, D, S) = e + a/N^α + b/D^β + c/(1−S)^λ + d/((1−S)^δ·N^γ), N = total params, S = sparsity.

    With ``unique_tokens`` (finite), D is the effective data D′ of Muennighoff et al. (2023); rows with a
    missing or infinite U repeat nothing. R_D* (``r_d_star``): "auto" (default) fits it when the runs span
    several epoch counts (``spans_epochs``: the repetition penalty is then measured, not assumed) and otherwise
    pins it at their 15.388, because it is weakly identified even on their 182 runs; a number pins it there
    (as does ``frozen={"R_D_star": …}``), None always fits it (start grid ``grid["log_R_D_star"]``); the notes
    say which. ``total_params(n_active, s)`` maps
    active to total params in ``optimum``; by default it is learnt from the fitted runs' own params and
    active_params (``total_params_from_runs``), which is Abnar et al.'s N_active/(1 − S) when every parameter
    is in a routed expert.
    """

    name = "Sparsity"
    title = "sparsity-aware (Abnar et al. 2025), all runs"
    uses_sparsity = True
    uses_unique_tokens = True
    limits = ("U", "sparsities", "n_range")
    optimum_returns = ("C", "S_star", "N_active", "N_total", "D", "U", "epochs", "loss")
    floor = "e"
    spec = (("log_e", "e", True), ("log_a", "a", True), ("alpha", "alpha", False), ("log_b", "b", True),
            ("beta", "beta", False), ("log_c", "c", True), ("lambda", "lambda", False), ("log_d", "d", True),
            ("delta", "delta", False), ("gamma", "gamma", False), ("log_R_D_star", "R_D_star", True))
    default_grid = {**SPARSITY_GRID, "log_R_D_star": np.log(R_STAR_GRID)}

    @classmethod
    def formula(cls, params: dict[str, float], digits: int = 6) -> str:
        v = _texts(params, digits)
        return (f"L = {v['e']} + {v['a']}/N^{v['alpha']} + {v['b']}/D′^{v['beta']} + {v['c']}/(1 − S)^{v['lambda']}"
                f" + {v['d']}/((1 − S)^{v['delta']}·N^{v['gamma']}); {_effective_data_text(v)} (D′ = D when U is "
                "unlimited)")

    def __init__(self, *, r_d_star: float | str | None = "auto",
                 frozen: dict[str, float] | None = None,
                 total_params: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, **options: Any):
        pinned = {} if r_d_star is None or r_d_star == "auto" else {"R_D_star": float(r_d_star)}
        super().__init__(frozen={**pinned, **(frozen or {})}, **options)
        self.auto_r_d_star = r_d_star == "auto" and "R_D_star" not in self.frozen
        self.total_params = total_params
        self._warm: np.ndarray | None = None

    def fit(self, frame: pd.DataFrame) -> Sparsity:
        span = spans_epochs(frame) if self.auto_r_d_star else None
        if self.auto_r_d_star:
            self.frozen.pop("R_D_star", None)
            if span is None:
                self.frozen["R_D_star"] = MUENNIGHOFF_R_D_STAR
        self._warm = self._pinned_basins(frame) if "R_D_star" not in self.frozen else None
        super().fit(frame)
        if self.auto_r_d_star:
            self.notes_.append(f"R_D_star fitted from the runs (repeated runs span {span[0]:.3g}–{span[1]:.3g} "
                               "epochs)" if span else "R_D_star pinned at Muennighoff et al.'s 15.388: the runs do "
                               "not span several epoch counts (fewer than 5 repeated runs, or epochs within 4x)")
        self.total_params_ = self.total_params or total_params_from_runs(frame)
        return self

    def _pinned_basins(self, frame: pd.DataFrame) -> np.ndarray:
        """Starts for a fit with R_D* free: the distinct basins of the fit with R_D* pinned at 15.388, each at
        every R_D* of the start grid (a fifth of the full grid's starts, and the pinned fit's basins are where
        the ten other parameters settle)."""
        pinned = copy.copy(self)
        pinned.frozen = {**self.frozen, "R_D_star": MUENNIGHOFF_R_D_STAR}
        pinned._warm = None
        data = pinned._data(frame, with_loss=True)
        pinned._validate(data)
        basins = solve(pinned._terms(data), data["y"], pinned._grid_starts(), pinned._free(),
                       delta=self.huber_delta).candidates
        log_r = np.asarray(self.grid["log_R_D_star"], float)
        starts = np.repeat(basins, len(log_r), axis=0)
        starts[:, self._position(["R_D_star"])[0]] = np.tile(log_r, len(basins))
        return starts

    def _grid_starts(self, names: Sequence[str] | None = None) -> np.ndarray:
        return self._warm if names is None and self._warm is not None else super()._grid_starts(names)

    def _optimum(self, C: float, params: dict[str, float], U: float | None = None,
                 sparsities: Sequence[float] | None = None,
                 n_range: tuple[float, float] | None = None) -> dict[str, float]:
        """Lowest predicted loss at budget C (C = 6·N_active·D) with U unique tokens (None: unlimited), over
        N_active (within ``n_range``; by default the sizes whose tokens per active parameter lie within the
        fitted runs' range, because a ten-parameter law is only trusted near the data it was fitted on) and S
        (``sparsities``, or a fine grid over [0, the largest fitted S]): S_star, N_active,
        N_total, D, epochs = D/U and loss."""
        theta = self._internal(params)
        grid = np.linspace(0, self.s_max_, 101) if sparsities is None else np.asarray(sparsities, float)
        total = self.total_params_
        n_range = n_range or self.supported_sizes(C)

        def loss(n: np.ndarray, s: np.ndarray) -> np.ndarray:
            u = np.full(n.size, np.inf if U is None else U)
            data = self._arrays(total(n, s).ravel(), C / (6 * n.ravel()), s.ravel(), u)
            return self._predict(theta, data).reshape(n.shape)

        s_star, n_active, best = _allocation_search(loss, C, grid, refine_s=sparsities is None, n_range=n_range)
        d = C / (6 * n_active)
        limits = {} if U is None else {"U": float(U), "epochs": d / U}
        return {"C": float(C), "S_star": s_star, "N_active": n_active,
                "N_total": float(total(np.array(n_active), np.array(s_star))), "D": d, **limits, "loss": best}

    def optimum_notes(self, ci: dict[str, tuple[float, float]]) -> list[str]:
        """Say so when the interval on S* covers most of the sparsities the runs sampled."""
        if "S_star" not in ci:
            return []
        lo, hi = ci["S_star"]
        if hi - lo < 0.75 * self.s_max_:
            return []
        return [f"S_star is weakly identified: its {self.level:.0%} interval {lo:.3g}–{hi:.3g} spans most of the "
                f"sampled sparsities (0–{self.s_max_:.3g}); more sizes or seeds per sparsity would narrow it"]

    def supported_sizes(self, C: float) -> tuple[float, float]:
        """The active sizes at budget C (C = 6·N_active·D) whose tokens per active parameter lie within the
        fitted runs' range."""
        lo, hi = self.tokens_per_active_
        return math.sqrt(C / (6 * hi)), math.sqrt(C / (6 * lo))

    def _validate(self, data: dict) -> None:
        levels = np.unique(data["log_1ms"])
        if len(levels) < 2:
            raise FitError(f"{self.name} needs runs at 2 or more sparsities; all runs have "
                           f"S = {-math.expm1(levels[0]):g}")
        self.s_max_ = float(-np.expm1(levels.min()))
        self.tokens_per_active_ = (float(np.nanmin(data["tokens_per_active"])),
                                   float(np.nanmax(data["tokens_per_active"])))

    def _data(self, frame: pd.DataFrame, with_loss: bool) -> dict:
        names = ["params", "tokens", "sparsity"] + (["loss"] if with_loss else [])
        cols = _columns(frame, self.name, names, positive=[n for n in names if n != "sparsity"])
        if ((cols["sparsity"] < 0) | (cols["sparsity"] >= 1)).any():
            raise FitError(f"{self.name}: sparsity must be in [0, 1)")
        unique = np.full(len(frame), np.inf)
        if "unique_tokens" in frame:
            given = pd.to_numeric(frame["unique_tokens"], errors="coerce").to_numpy(float)
            unique = np.where(np.isfinite(given) & (given > 0), given, np.inf)
        data = self._arrays(cols["params"], cols["tokens"], cols["sparsity"], unique)
        if with_loss:
            data["y"] = np.log(cols["loss"])
            active = (pd.to_numeric(frame["active_params"], errors="coerce").to_numpy(float)
                      if "active_params" in frame else cols["params"] * (1 - cols["sparsity"]))
            data["tokens_per_active"] = cols["tokens"] / active
        return data

    @staticmethod
    def _arrays(n: np.ndarray, d: np.ndarray, s: np.ndarray, u: np.ndarray) -> dict:
        unique = np.minimum(u, d)
        return {"n": len(n), "log_n": np.log(n), "log_1ms": np.log1p(-s), "log_u": np.log(unique),
                "repeats": d / unique - 1}

    def _terms(self, data: dict) -> Terms:
        log_n, log_1ms, log_u, repeats = data["log_n"], data["log_1ms"], data["log_u"], data["repeats"]
        if "R_D_star" in self.frozen:  # the same D′ for every start: computed once
            pinned = _effective(log_u, repeats, np.log([self.frozen["R_D_star"]]))[0][0]

        def terms(theta: np.ndarray):
            p = self._named(theta)
            beta, delta, gamma = p["beta"], p["delta"], p["gamma"]
            if "R_D_star" in self.frozen:
                log_d_eff, d_star = pinned, []
            else:
                log_d_eff, dd_star, _ = _effective(log_u, repeats, p["log_R_D_star"][:, 0])
                d_star = [(2, -beta * dd_star)]
            return ([p["log_e"], p["log_a"] - p["alpha"] * log_n, p["log_b"] - beta * log_d_eff,
                     p["log_c"] - p["lambda"] * log_1ms, p["log_d"] - delta * log_1ms - gamma * log_n],
                    self._by_parameter({
                        "log_e": [(0, 1.0)], "log_a": [(1, 1.0)], "alpha": [(1, -log_n)], "log_b": [(2, 1.0)],
                        "beta": [(2, -log_d_eff)], "log_c": [(3, 1.0)], "lambda": [(3, -log_1ms)],
                        "log_d": [(4, 1.0)], "delta": [(4, -log_1ms)], "gamma": [(4, -log_n)],
                        "log_R_D_star": d_star}))

        return terms


# ---------------------------------------------------------------------------------------- isoFLOP


def _parabolas(u: np.ndarray, y: np.ndarray, groups: np.ndarray, n_groups: int, W: np.ndarray) -> dict:
    """Weighted least-squares parabolas y ≈ c0 + c1·v + c2·v² (v = u − the group's mean u) per group and per
    weight row of W (R, n), each (R, G): vertex u*, its delta-method standard error, the value there, the
    curvature c2, the sampled range of u (rows with weight) and whether the vertex lies inside it; plus the
    coefficients (R, G, 3) and centers (G,)."""
    R = len(W)
    out = {k: np.full((R, n_groups), np.nan) for k in ("vertex", "se", "value", "value_se", "curvature", "lo", "hi")}
    out["coef"], out["center"] = np.full((R, n_groups, 3), np.nan), np.zeros(n_groups)
    for g in range(n_groups):
        idx = np.flatnonzero(groups == g)
        center = out["center"][g] = u[idx].mean()
        v = u[idx] - center
        X = np.stack([np.ones_like(v), v, v * v], axis=1)
        w = W[:, idx]
        order = np.argsort(v, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(v[order]) != 0])  # the first row of each distinct size
        level_w = np.add.reduceat(w[:, order], starts, axis=1)  # (R, sizes): no (n, sizes) one-hot matrix
        ok = (level_w > 0).sum(axis=1) >= 3  # 3+ distinct sizes drawn
        A = np.einsum("rn,ni,nj->rij", w, X, X)
        A[~ok] = np.eye(3)
        coef = np.linalg.solve(A, np.einsum("rn,ni,n->ri", w, X, y[idx])[..., None])[..., 0]
        c0, c1, c2 = coef.T
        dof = w.sum(axis=1) - 3
        with np.errstate(all="ignore"):
            sigma2 = np.where(dof > 0, (w * (y[idx] - coef @ X.T) ** 2).sum(axis=1) / dof, np.nan)
            cov_all = sigma2[:, None, None] * np.linalg.inv(A)
            cov = cov_all[:, 1:, 1:]
            grad = np.stack([-1 / (2 * c2), c1 / (2 * c2**2)], axis=1)  # ∂vertex/∂(c1, c2)
            grad_value = np.stack([np.ones_like(c1), -c1 / (2 * c2), c1**2 / (4 * c2**2)], axis=1)  # ∂value/∂c
            sampled = np.where(w > 0, v, np.nan)
            values = {"vertex": center - c1 / (2 * c2),
                      "se": np.sqrt(np.einsum("ri,rij,rj->r", grad, cov, grad)),
                      "value": c0 - c1**2 / (4 * c2),
                      "value_se": np.sqrt(np.einsum("ri,rij,rj->r", grad_value, cov_all, grad_value)),
                      "curvature": c2,
                      "lo": np.nanmin(sampled, axis=1) + center, "hi": np.nanmax(sampled, axis=1) + center}
        for k, value in values.items():
            out[k][ok, g] = value[ok]
        out["coef"][ok, g] = coef[ok]
    out["in_range"] = (out["curvature"] > 0) & (out["vertex"] >= out["lo"]) & (out["vertex"] <= out["hi"])
    return out


def _line_fits(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares lines y = intercept + slope·x per row of y, w (R, G); NaN with < 2 points."""
    w = np.where(np.isfinite(y), w, 0.0)
    y = np.where(w > 0, y, 0.0)
    s0, s1, s2 = w.sum(axis=1), w @ x, w @ (x * x)
    t0, t1 = (w * y).sum(axis=1), (w * y) @ x
    with np.errstate(all="ignore"):
        slope = (s0 * t1 - s1 * t0) / (s0 * s2 - s1**2)
        intercept = (t0 - slope * s1) / s0
    enough = (w > 0).sum(axis=1) >= 2
    return np.where(enough, slope, np.nan), np.where(enough, intercept, np.nan)


class IsoFLOP(Law):
    """Chinchilla approach 2 (Hoffmann et al. 2022): per budget, parabolas of loss in log10 N and in log10 D;
    their vertices N*(C), D*(C) (delta-method intervals), then log10 N* = log10 k_N + a·log10 C and
    log10 D* = log10 k_D + b·log10 C by statsmodels OLS (WLS on the vertices' precision with ``weighted``).

    N is ``x`` (``active_params`` or ``params``). Budgets: the ``budget`` column, else ``flops`` grouped
    within a factor 1 + ``rtol``. Vertices outside the sampled range, or of a parabola opening downwards, are
    flagged in ``vertices_`` and left out of the power laws. Known bias: with α ≠ β the vertex is biased even
    without noise, the exponent is not. ``objective_`` is the parabolas' residual sum of squares. The
    bootstrap resamples runs within each budget.
    """

    name = "IsoFLOP"
    title = "isoFLOP (Chinchilla approach 2)"
    optimum_returns = ("C", "N_opt", "D_opt")

    def __init__(self, *, x: str = "active_params", rtol: float = 0.1, weighted: bool = False,
                 bootstrap: int = 0, seed: int = 0, level: float = 0.95):
        super().__init__(bootstrap=bootstrap, seed=seed, level=level)
        if x not in ("active_params", "params"):
            raise FitError(f"x must be 'active_params' or 'params', not {x!r}")
        self.x, self.rtol, self.weighted = x, rtol, weighted
        self.vertices_ = pd.DataFrame()

    def fit(self, frame: pd.DataFrame) -> IsoFLOP:
        self._reset()
        data = self._data(frame)
        self.n_points_ = data["n"]
        point = self._estimate(data, np.ones((1, data["n"])))
        nv, dv = ({k: v[0] for k, v in point[part].items() if k != "center"} for part in ("n", "d"))
        fitted = np.isfinite(nv["vertex"]) & np.isfinite(dv["vertex"])
        usable = fitted & nv["in_range"] & dv["in_range"]
        self._coef, self._centers, self._budgets = nv["coef"], point["n"]["center"], data["budgets"]
        from scipy import stats

        z = stats.norm.ppf(0.5 + self.level / 2)
        self.vertices_ = pd.DataFrame({
            "budget": data["budgets"], "n_opt": 10 ** nv["vertex"],
            "n_lo": 10 ** (nv["vertex"] - z * nv["se"]), "n_hi": 10 ** (nv["vertex"] + z * nv["se"]),
            "d_opt": 10 ** dv["vertex"],
            "d_lo": 10 ** (dv["vertex"] - z * dv["se"]), "d_hi": 10 ** (dv["vertex"] + z * dv["se"]),
            "loss_opt": nv["value"], "loss_lo": nv["value"] - z * nv["value_se"],
            "loss_hi": nv["value"] + z * nv["value_se"], "in_range": usable,
            "n_points": np.bincount(data["groups"], minlength=len(data["budgets"])),
        })[fitted].reset_index(drop=True)
        self.notes_ += [f"budget C = {c:.3g} has fewer than 3 distinct sizes: no vertex"
                        for c in data["budgets"][~fitted]]
        self.notes_ += [f"budget C = {c:.3g}: vertex outside the sampled range (or a parabola opening "
                        "downwards); left out of the power-law fit"
                        for c in data["budgets"][fitted & ~usable]]
        if usable.sum() < 2:
            raise FitError(f"{self.name} needs at least 2 budgets with an in-range vertex (3+ distinct sizes "
                           f"each); got {usable.sum()} of {len(data['budgets'])} budgets")
        import statsmodels.api as sm

        log_c = sm.add_constant(np.log10(data["budgets"][usable]))
        for name, k, part in (("a", "k_N", nv), ("b", "k_D", dv)):
            weights = 1 / part["se"][usable] ** 2 if self.weighted else np.ones(usable.sum())
            if not np.isfinite(weights).all():
                raise FitError(f"{self.name}: the weighted fit needs 4+ runs per budget (vertex standard "
                               "errors)")
            ols = sm.WLS(part["vertex"][usable], log_c, weights=weights).fit()
            self.params_[name], self.params_[k] = float(ols.params[1]), float(10 ** ols.params[0])
            if ols.df_resid > 0:
                (lo_k, hi_k), (lo, hi) = ols.conf_int(1 - self.level)
                self.ci_[name], self.ci_[k] = (float(lo), float(hi)), (float(10**lo_k), float(10**hi_k))
        self.objective_ = float(point["rss"][0])
        self.notes_.append("vertices are biased when α ≠ β (the loss is not symmetric in log N); the "
                           "exponents a, b are not")
        if self.bootstrap:
            t_intervals = {k: self.ci_[k] for k in ("a", "b") if k in self.ci_}
            self._run_bootstrap(frame, lambda W: self._samples(data, W), strata=data["groups"])
            self.notes_ += [f"statsmodels {self.level:.0%} t-interval of {k}: {lo:.3g}–{hi:.3g}"
                            for k, (lo, hi) in t_intervals.items()]
        elif usable.sum() == 2:
            self.notes_.append("2 budgets: the power laws pass through both vertices, no interval without "
                               "bootstrap")
        else:
            self.notes_.append(f"intervals: {self.level:.0%} t-intervals of the statsmodels "
                               f"{'WLS' if self.weighted else 'OLS'} power-law fits")
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Loss on each row's budget parabola in log10 N (NaN for a budget not fitted)."""
        self._check_fitted()
        budget_col = "budget" if "budget" in frame else "flops"
        cols = _columns(frame, self.name, [self.x, budget_col], positive=[self.x, budget_col])
        log_b, log_fit = np.log(budget_groups(frame, self.rtol)), np.log(self._budgets)
        g = np.abs(log_b[:, None] - log_fit[None]).argmin(axis=1)
        near = np.abs(log_b - log_fit[g]) <= math.log1p(self.rtol)
        v, c = np.log10(cols[self.x]) - self._centers[g], self._coef[g]
        return np.where(near, c[:, 0] + c[:, 1] * v + c[:, 2] * v * v, np.nan)

    def _optimum(self, C: float, params: dict[str, float], **limits: Any) -> dict[str, float]:
        """N* = k_N·C^a and D* = k_D·C^b at budget C."""
        p = params
        return {"C": float(C), "N_opt": p["k_N"] * C ** p["a"], "D_opt": p["k_D"] * C ** p["b"]}

    def tables(self) -> dict[str, pd.DataFrame]:
        """The per-budget vertices N*, D*, L* with their delta-method intervals (``vertices_``)."""
        return {"vertices": self.vertices_}

    def _data(self, frame: pd.DataFrame) -> dict:
        budget_col = "budget" if "budget" in frame else "flops"
        cols = _columns(frame, self.name, [self.x, "tokens", "loss", budget_col],
                        positive=[self.x, "tokens", budget_col])
        budgets, groups = np.unique(budget_groups(frame, self.rtol), return_inverse=True)
        if len(budgets) == 0:
            raise FitError(f"{self.name}: no runs to fit")
        if len(budgets) < 2:
            raise FitError(f"{self.name} needs runs at 2 or more budgets; all {len(frame)} runs are at "
                           f"C = {budgets[0]:.3g}")
        return {"n": len(frame), "budgets": budgets, "groups": groups, "log_n": np.log10(cols[self.x]),
                "log_d": np.log10(cols["tokens"]), "loss": cols["loss"]}

    def _estimate(self, data: dict, W: np.ndarray) -> dict:
        args = (data["loss"], data["groups"], len(data["budgets"]), W)
        n_fit, d_fit = _parabolas(data["log_n"], *args), _parabolas(data["log_d"], *args)
        rss = np.zeros(len(W))
        for g in range(len(data["budgets"])):
            idx = data["groups"] == g
            v = data["log_n"][idx] - n_fit["center"][g]
            c = n_fit["coef"][:, g]
            pred = c[:, :1] + c[:, 1:2] * v + c[:, 2:] * v * v
            rss += np.nan_to_num((W[:, idx] * (data["loss"][idx] - pred) ** 2).sum(axis=1))
        return {"n": n_fit, "d": d_fit, "rss": rss}

    def _samples(self, data: dict, W: np.ndarray) -> pd.DataFrame:
        fit = self._estimate(data, W)
        use = fit["n"]["in_range"] & fit["d"]["in_range"]
        out = {}
        for name, k, part in (("a", "k_N", fit["n"]), ("b", "k_D", fit["d"])):
            w = use / part["se"] ** 2 if self.weighted else use.astype(float)
            slope, intercept = _line_fits(np.log10(data["budgets"]), part["vertex"], np.nan_to_num(w))
            out[name], out[k] = slope, 10**intercept
        return pd.DataFrame(out)[list(self.params_)]


# ---------------------------------------------------------------------------------------- envelope


class Envelope(Law):
    """Loss envelopes and effective compute: per variant (``sparsity``; 0 = dense) the best loss per budget,
    L(C) = L∞ + A·C^(−α) (an irreducible loss plus a power law in compute, Henighan et al.'s 2020 form). The
    joint fit shares L∞ and α and gives each variant its own A (params_ ``L_inf``, ``alpha``, ``A_S0.5``, …); a
    variant's effective compute multiplier over dense is
    ((L_dense − L∞)/(L_variant − L∞))^(1/α) = (A_dense/A_variant)^(1/α) at every C (``multiplier_S0.5``).
    ``variants_`` holds separate fits (each variant's own L∞, A, α) of variants with 4+ budgets (3+ with
    ``l_inf`` pinning L∞). Fitted in the LSE form with the same Huber objective as the other laws (C: the
    ``budget`` column, else ``flops`` grouped within 1 + ``rtol``); the bootstrap resamples runs within each
    (variant, budget). ``points="vertex"`` takes each (variant, budget)'s isoFLOP parabola vertex (loss in
    log10 of ``active_params``, else ``params``) instead of its best run, where the vertex lies inside the
    sampled sizes (else the best run).
    """

    name = "Envelope"
    title = "loss envelope and effective compute per sparsity"
    uses_sparsity = True
    freezable = ("L_inf",)
    optimum_returns = ("C", "loss_{S}")

    def __init__(self, *, l_inf: float | None = None, points: str = "best", rtol: float = 0.1,
                 huber_delta: float = HUBER_DELTA, bootstrap: int = 0, seed: int = 0, level: float = 0.95):
        super().__init__(bootstrap=bootstrap, seed=seed, level=level)
        if points not in ("best", "vertex"):
            raise FitError(f"points must be 'best' or 'vertex', not {points!r}")
        self.l_inf, self.points, self.rtol, self.huber_delta = l_inf, points, rtol, huber_delta
        self.variants_ = pd.DataFrame()

    def fit(self, frame: pd.DataFrame) -> Envelope:
        self._reset()
        data = self._data(frame)
        self.n_points_ = data["n"]
        self._levels = data["levels"]
        if self._levels[0] != 0:
            self.notes_.append(f"no dense runs: multipliers are relative to S = {self._levels[0]:g}")
        y = np.log(self._best(data, np.ones((1, data["n"]))))
        if self.l_inf is not None and self.l_inf >= np.exp(y).min():
            raise FitError(f"{self.name}: l_inf = {self.l_inf:g} must be below every envelope point (the lowest "
                           f"is {np.exp(y).min():.4g})")
        sol = self._solve(data, y, self._starts(data, y[0]), polish=True)
        if not sol.converged[0]:
            raise FitError(f"{self.name} fit did not converge (objective {sol.fun[0]:.4g})")
        self.params_ = self._public(sol.x[0])
        self.objective_ = float(sol.fun[0])
        self.variants_ = self._separate(data, y[0])
        self._run_bootstrap(frame, lambda W: self._samples(data, W, sol.candidates), strata=data["strata"])
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """L∞ + A_variant·C^(−α) per row (C: ``budget`` if present, else ``flops``); NaN for a variant not
        fitted."""
        self._check_fitted()
        budget_col = "budget" if "budget" in frame else "flops"
        cols = _columns(frame, self.name, [budget_col], positive=[budget_col])
        sparsity = frame["sparsity"].to_numpy(float) if "sparsity" in frame else np.zeros(len(frame))
        p = self.params_
        amp = np.array([p.get(f"A_{_label(s)}", np.nan) for s in sparsity])
        return p["L_inf"] + amp * cols[budget_col] ** -p["alpha"]

    @classmethod
    def freeze_options(cls, values: dict[str, float]) -> dict[str, Any]:
        """``--freeze L_inf=VALUE`` pins L∞ (``l_inf``)."""
        return {"l_inf": values["L_inf"]} if super().freeze_options(values) else {}

    def _optimum(self, C: float, params: dict[str, float], **limits: Any) -> dict[str, float]:
        """Each variant's envelope loss at budget C (``loss_S0.5``, …)."""
        p = params
        return {"C": float(C), **{f"loss_{_label(s)}": p["L_inf"] + p[f"A_{_label(s)}"] * C ** -p["alpha"]
                                  for s in self._levels}}

    def _data(self, frame: pd.DataFrame) -> dict:
        """Rows of variants with 2+ budgets, their (variant, budget) cell, and per cell log C and variant."""
        budget_col = "budget" if "budget" in frame else "flops"
        size_col = "active_params" if "active_params" in frame else "params"
        names = ["loss", budget_col] + (["sparsity"] if "sparsity" in frame else [])
        sizes = [size_col] if self.points == "vertex" else []
        cols = _columns(frame, self.name, names + sizes, positive=["loss", budget_col, *sizes])
        codes, cells = pd.factorize(pd.MultiIndex.from_arrays(
            [cols.get("sparsity", np.zeros(len(frame))), budget_groups(frame, self.rtol)]), sort=True)
        cell_s = cells.get_level_values(0).to_numpy(float)
        counts = pd.Series(cell_s).value_counts()
        few = sorted(counts[counts < 2].index)
        self.notes_ += [f"S = {s:g} has runs at only 1 budget: left out" for s in few]
        keep = ~np.isin(cell_s, few)
        if not keep.any():
            raise FitError(f"{self.name} needs a variant with runs at 2 or more budgets")
        levels, variant = np.unique(cell_s[keep], return_inverse=True)
        n_params = len(levels) + (1 if self.l_inf is not None else 2)
        if keep.sum() <= n_params:
            raise FitError(f"{self.name} needs more (variant, budget) points than parameters ({n_params}); "
                           f"got {keep.sum()}")
        if self.l_inf is not None and self.l_inf >= cols["loss"].min():
            raise FitError(f"{self.name}: l_inf = {self.l_inf:g} must be below the lowest loss")
        rows = keep[codes]
        cell = (np.cumsum(keep) - 1)[codes[rows]]
        sizes = np.log10(cols[size_col][rows]) if self.points == "vertex" else None
        return {"n": int(rows.sum()), "loss": cols["loss"][rows], "strata": cell, "variant": variant,
                "log_c": np.log(cells.get_level_values(1).to_numpy(float)[keep]), "levels": levels,
                "log_n": sizes}

    def _best(self, data: dict, W: np.ndarray) -> np.ndarray:
        """The loss of each (variant, budget) cell from the rows drawn, (R, cells): the lowest, or with
        ``points="vertex"`` the parabola vertex where it lies inside the drawn sizes."""
        out = np.full((len(W), len(data["log_c"])), np.inf)
        np.minimum.at(out.T, data["strata"], np.where(W > 0, data["loss"], np.inf).T)
        if self.points == "vertex":
            par = _parabolas(data["log_n"], data["loss"], data["strata"], len(data["log_c"]), W)
            inside = par["in_range"] & np.isfinite(par["value"]) & (par["value"] > 0)
            out = np.where(inside, par["value"], out)
        return out

    def _terms(self, data: dict) -> Terms:
        log_c, variant = data["log_c"], data["variant"]
        indicators = [(variant == v).astype(float) for v in range(len(data["levels"]))]

        def terms(theta: np.ndarray):
            return ([theta[:, :1], theta[:, 2 + variant] - theta[:, 1:2] * log_c],
                    [[(0, 1.0)], [(1, -log_c)]] + [[(1, ind)] for ind in indicators])

        return terms

    def _starts(self, data: dict, y: np.ndarray) -> np.ndarray:
        """Starts from the data: L∞ at fractions of the lowest loss (or pinned), α on a grid, each variant's
        log A from its mean excess loss."""
        low = math.exp(y.min())
        l_values = [self.l_inf] if self.l_inf is not None else [low * f for f in (0.5, 0.75, 0.9, 0.97)]
        starts = []
        for l_inf, alpha in itertools.product(l_values, (0.05, 0.1, 0.2, 0.35, 0.5)):
            excess = np.log(np.maximum(np.exp(y) - l_inf, 1e-3 * low)) + alpha * data["log_c"]
            starts.append([math.log(l_inf), alpha,
                           *(excess[data["variant"] == v].mean() for v in range(len(data["levels"])))])
        return np.array(starts)

    def _solve(self, data: dict, y: np.ndarray, starts: np.ndarray, **mode: bool) -> Solution:
        free = np.ones(starts.shape[-1], bool)
        free[0] = self.l_inf is None
        return solve(self._terms(data), y, starts, free, delta=self.huber_delta, **mode)

    def _public(self, theta: np.ndarray) -> dict[str, float]:
        with np.errstate(over="ignore"):
            out = {"L_inf": float(np.exp(theta[0])), "alpha": float(theta[1])}
            out.update({f"A_{_label(s)}": float(np.exp(a))
                        for s, a in zip(self._levels, theta[2:], strict=True)})
            out.update({f"multiplier_{_label(s)}": float(np.exp((theta[2] - a) / theta[1]))
                        for s, a in zip(self._levels[1:], theta[3:], strict=True)})
        return out

    def _samples(self, data: dict, W: np.ndarray, warm: np.ndarray) -> pd.DataFrame:
        sol = self._solve(data, np.log(self._best(data, W)), warm, precise=True)
        rows = [self._public(t) if np.isfinite(f) else {} for t, f in zip(sol.x, sol.fun, strict=True)]
        return pd.DataFrame(rows, columns=list(self.params_))

    def _separate(self, data: dict, y: np.ndarray) -> pd.DataFrame:
        rows = []
        for v, s in enumerate(data["levels"]):
            mine = data["variant"] == v
            row = {"sparsity": s, "n_budgets": int(mine.sum()), "L_inf": np.nan, "A": np.nan, "alpha": np.nan}
            if mine.sum() > (2 if self.l_inf is not None else 3):
                sub = {"log_c": data["log_c"][mine], "variant": np.zeros(mine.sum(), int),
                       "levels": data["levels"][[v]]}
                sol = self._solve(sub, y[mine], self._starts(sub, y[mine]), polish=True)
                if sol.converged[0]:
                    row.update(L_inf=math.exp(sol.x[0, 0]), A=math.exp(sol.x[0, 2]), alpha=sol.x[0, 1])
            rows.append(row)
        return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------- fit_law


LAWS: dict[str, type[Law]] = {"isoflop": IsoFLOP, "chinchilla": Chinchilla,
                              "data-constrained": DataConstrained, "sparsity": Sparsity, "envelope": Envelope}
import scaling.sparsity_vertex  # noqa: E402, F401  (registers "sparsity-vertex"; it builds on this module)


def fit_law(frame: pd.DataFrame, law: str, *, bootstrap: int = 0, budget: float | None = None,
            unique_tokens: float | None = None, seed: int = 0, level: float = 0.95, **options: Any) -> dict:
    """Fit ``law`` (a key of ``LAWS``) and summarise it as plain JSON (see ``summarize``). ``options`` go to the
    law's constructor."""
    if law not in LAWS:
        raise FitError(f"unknown law {law!r}; choose one of {', '.join(LAWS)}")
    model = LAWS[law](bootstrap=bootstrap, seed=seed, level=level, **options).fit(frame)
    return summarize(model, law, budget, unique_tokens)


def summarize(model: Law, law: str, budget: float | None = None, unique_tokens: float | None = None) -> dict:
    """A fitted law as plain JSON: law, params, ci (name → [lo, hi], for parameters and the optimum's
    quantities), optimum (at ``budget``, under ``unique_tokens`` for the laws that take that limit), objective,
    n_points, notes, and the law's ``tables`` (e.g. isoFLOP vertices) as lists of rows."""
    notes, ci, optimum = list(model.notes_), dict(model.ci_), {}
    takes_u = "U" in model.limits
    limit = {"U": unique_tokens} if takes_u else {}
    if budget is not None:
        optimum = model.optimum(budget, **limit)
        if model.bootstrap_ is not None:
            draws = pd.DataFrame([model.optimum(budget, params=row, **limit)
                                  for row in model.bootstrap_.to_dict("records")])
            ci.update(percentile_intervals(draws.drop(columns=["C", "U"], errors="ignore"), model.level))
            notes += model.optimum_notes(ci)
    if unique_tokens is not None and not takes_u:
        notes.append(f"unique_tokens is not used by the {law} law")
    elif unique_tokens is not None and budget is None:
        notes.append("give a budget as well for the compute-optimal allocation under the unique-token limit")
    return {"law": law, "params": _plain(model.params_),
            "ci": {k: [float(lo), float(hi)] for k, (lo, hi) in ci.items() if np.isfinite([lo, hi]).all()},
            "optimum": _plain(optimum), "objective": float(model.objective_),
            "n_points": int(model.n_points_), "notes": notes,
            **{name: _records(table) for name, table in model.tables().items()}}


def result_rows(result: dict[str, Any], by_name: bool = False) -> pd.DataFrame:
    """A fit (``summarize``'s dict) as rows kind (param or optimum), name, value, ci_lo, ci_hi (NaN without an
    interval): what the command prints, the report shows and the store keeps. ``by_name``: one row per name, an
    optimum value replacing a parameter of the same name (the store's key)."""
    rows = []
    for kind, values in (("param", result.get("params", {})), ("optimum", result.get("optimum", {}))):
        for name, value in values.items():
            if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
                continue
            lo, hi = (result.get("ci", {}).get(name) or [np.nan, np.nan])[:2]
            rows.append({"kind": kind, "name": name, "value": float(value), "ci_lo": lo, "ci_hi": hi})
    out = pd.DataFrame(rows, columns=["kind", "name", "value", "ci_lo", "ci_hi"])
    return out.drop_duplicates("name", keep="last") if by_name else out


def _plain(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if np.isfinite(v)}


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """A table as JSON rows: flags as booleans, counts as integers, other numbers as floats (NaN as None)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating)):
            return float(v) if np.isfinite(v) else None
        return v

    return [{k: plain(v) for k, v in row.items()} for row in table.to_dict("records")]
