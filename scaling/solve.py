"""The solver layer of the laws: the log-space Huber objective, its Newton form for terms linear in the
parameters (``LinearTerms``), and ``solve``, which minimises it from many starts for many problems at once.

A law supplies its log-terms t_k(θ; x): log L̂ = LSE_k t_k, the objective is SUM over runs of
Huber_δ(log L̂ − log L) with δ = 1e-3 (Hoffmann et al. 2022; Besiroglu et al., Epoch AI, 2024). All starts, and
all bootstrap resamples, run together as one batch (``scaling.optimize``): terms linear in the parameters by
damped Newton with analytic Hessians, starts that fall clearly behind dropped on the way (``PRUNE``); others by
L-BFGS, as Hoffmann et al. did. Nothing here knows a law's names or columns.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scaling.optimize import Prune, lbfgs, newton

HUBER_DELTA = 1e-3
KEEP = 24  # distinct basins kept from a point fit as warm starts for its bootstrap refits
COARSE_POINTS = 20_000  # points a Newton grid's coarse first steps see (``_coarse``); all of them when fewer
GRID_ITERATIONS = 200  # per start of an L-BFGS grid; the best distinct end points are then polished to convergence
PRUNE = Prune(after=2, until=5, first=10.0, last=2.0, keep=32, patience=40)
"""Newton grids: from step 2 a start whose objective is over 10 times its problem's best so far (the factor
shrinking to 2 by step 5) and that is not among the 32 best is dropped, and from step 40 every start still
running behind its problem's best. On Epoch's Chinchilla points hundreds of the starts that end in the best
basin stay within those factors at every step and the 8 best are all in it from step 2; the best start gets
there by step ~35, and the best objective equals scipy's best over all 4,500 starts (benchmarks/fit_speed.py)."""
Terms = Callable[[np.ndarray], tuple[list[np.ndarray], list[list[tuple[int, Any]]]]]


class LogSumObjective:
    """Σ_i w_i·Huber_δ(LSE_k t_k(θ; x_i) − log L_i) and its gradient, for a batch of parameter vectors θ.

    ``terms(theta)`` returns the K log-terms t_k, each (b, n) or (b, 1) (the latter free of data, so with
    scalar derivatives only), and for each parameter j the pairs (k, ∂t_k/∂θ_j) with the derivative a scalar,
    an (n,) or a (b, n) array. ``log_loss`` is (n,) or one row per problem, ``weights`` (bootstrap counts)
    one row per problem, shared by ``per`` consecutive batch rows (the starts of one problem: never copied per
    start). Problems are evaluated in blocks of at most ~12,000 elements: arrays under glibc's 128 KiB mmap
    threshold are reused rather than page-faulted in afresh by every operation (4x faster here).
    """

    def __init__(self, terms: Terms, log_loss: np.ndarray, delta: float = HUBER_DELTA,
                 weights: np.ndarray | None = None, per: int = 1):
        self.terms, self.y, self.delta, self.weights, self.per = terms, log_loss, delta, weights, per
        self.block = max(1, 12000 // log_loss.shape[-1])

    def __call__(self, theta: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, g = np.empty(len(theta)), np.empty(theta.shape)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing exp is redone shifted
            for i in range(0, len(theta), self.block):
                part = slice(i, i + self.block)
                f[part], g[part] = self._block(theta[part], rows[part])
        return f, g

    def log_prediction(self, theta: np.ndarray) -> np.ndarray:
        """log L̂ = LSE of the terms, (b, n)."""
        terms, _ = self.terms(theta)
        top = _lse_max(terms)
        return top + np.log(_total([np.exp(t - top) for t in terms]))

    def _block(self, theta: np.ndarray, rows: np.ndarray,
               shift: bool = False) -> tuple[np.ndarray, np.ndarray]:
        terms, jac = self.terms(theta)
        y = self.y if self.y.ndim == 1 else self.y[rows // self.per]
        top = _lse_max(terms) if shift else 0.0  # unshifted by default: terms of shape (b, 1) stay narrow
        parts = [np.exp(t - top) for t in terms]
        total = _total(parts)
        r = np.log(total) - y + top
        c = np.clip(r, -self.delta, self.delta)  # Huber'(r); Huber(r) = c·(r − c/2)
        if self.weights is not None:
            w = self.weights[rows // self.per]
            f = np.einsum("ij,ij,ij->i", w, c, r) - 0.5 * np.einsum("ij,ij,ij->i", w, c, c)
            c *= w
        else:
            f = np.einsum("ij,ij->i", c, r) - 0.5 * np.einsum("ij,ij->i", c, c)
        c /= total
        q = [c * p if p.shape[1] > 1 else p for p in parts]  # ∂f/∂t_k per point (narrow terms: summed below)
        sums = [qk.sum(axis=1) if p.shape[1] > 1 else p[:, 0] * c.sum(axis=1)
                for qk, p in zip(q, parts, strict=True)]
        g = np.zeros(theta.shape)
        for j, pairs in enumerate(jac):
            for k, d in pairs:
                if np.ndim(d) == 0:
                    g[:, j] += d * sums[k]
                elif np.ndim(d) == 1:
                    g[:, j] += np.dot(q[k], d)
                else:
                    g[:, j] += np.einsum("ij,ij->i", q[k], d)
        bad = ~np.isfinite(r).all(axis=1)
        if bad.any() and not shift:  # overflow or underflow: these problems again with the max-shifted LSE
            f[bad], g[bad] = self._block(theta[bad], rows[bad], shift=True)
        return f, g


def _lse_max(terms: list[np.ndarray]) -> np.ndarray:
    top = terms[0]
    for t in terms[1:]:
        top = np.maximum(top, t)
    return top


def _total(parts: list[np.ndarray]) -> np.ndarray:
    """Sum of the exponentiated terms, full-width parts first so that the narrow ones add in place."""
    parts = sorted(parts, key=lambda p: -p.shape[1])
    total = parts[0] + parts[1] if len(parts) > 1 else parts[0].copy()
    for p in parts[2:]:
        total += p
    return total


class LinearTerms:
    """Log-terms linear in the parameters: t_k = offset_k + Σ_j coef_kj·θ_j, each offset and coefficient a
    scalar or one value per point (n,). Laws of this form (Chinchilla's t = (a − α·log N, b − β·log D, e))
    have an analytic Hessian cheap enough for Newton's method (``LinearLogSumObjective``); called with θ
    they give the terms and their derivatives like any ``Terms`` function (for ``LogSumObjective``)."""

    def __init__(self, n_params: int, terms: Sequence[tuple[Any, dict[int, Any]]], n_points: int):
        self.n_params, self.n = n_params, n_points
        self.given = [(offset, dict(coefs)) for offset, coefs in terms]
        self.offsets = [offset for offset, _ in terms]
        self.coefs = [dict(sorted(coefs.items())) for _, coefs in terms]
        self.index = [np.array(list(c), int) for c in self.coefs]
        # a narrow term (the same value at every point, e.g. e) is evaluated (b, 1) wide
        narrow = [np.ndim(o) == 0 and all(np.ndim(v) == 0 for v in c.values())
                  for o, c in zip(self.offsets, self.coefs, strict=True)]
        self.matrix = [np.array([np.broadcast_to(np.asarray(v, float), (1 if thin else n_points,))
                                 for v in c.values()]) for c, thin in zip(self.coefs, narrow, strict=True)]
        full = [np.array([np.broadcast_to(np.asarray(v, float), (n_points,)) for v in c.values()])
                for c in self.coefs]
        self.gradient_coefs = [m.T.copy() for m in full]  # (n, |J_k|)
        # Hessian: for each pair of terms k ≤ m, the products coef_kj·coef_mi per point (n, |J_k|·|J_m|); the
        # sums over points of (weights × products) of all pairs, side by side, times ``hessian_scatter`` give
        # the flattened (p, p) matrix (both triangles)
        self.pairs: list[tuple[int, int, np.ndarray, slice]] = []
        scatter = []
        for k, m in itertools.combinations_with_replacement(range(len(terms)), 2):
            products = (full[k][:, None, :] * full[m][None, :, :]).reshape(-1, n_points).T.copy()
            rows, cols = (a.ravel() for a in np.meshgrid(self.index[k], self.index[m], indexing="ij"))
            columns = slice(len(scatter), len(scatter) + len(rows))
            for r, c in zip(rows, cols, strict=True):
                entry = np.zeros(n_params * n_params)
                entry[r * n_params + c] += 1
                if k != m:
                    entry[c * n_params + r] += 1
                scatter.append(entry)
            self.pairs.append((k, m, products, columns))
        self.hessian_scatter = np.array(scatter)
        self.dtype = np.dtype(float)

    def __call__(self, theta: np.ndarray) -> tuple[list[np.ndarray], list[list[tuple[int, Any]]]]:
        jac: list[list[tuple[int, Any]]] = [[] for _ in range(self.n_params)]
        for k, coefs in enumerate(self.coefs):
            for j, v in coefs.items():
                jac[j].append((k, v))
        return self.values(theta), jac

    def values(self, theta: np.ndarray) -> list[np.ndarray]:
        """t_k for a batch θ (b, p): (b, n), or (b, 1) for a narrow term."""
        theta = theta.astype(self.dtype, copy=False)
        out = []
        for j, m, o in zip(self.index, self.matrix, self.offsets, strict=True):
            t = theta[:, j] @ m
            if not isinstance(o, float) or o != 0.0:
                t += o
            out.append(t)
        return out

    def subset(self, points: np.ndarray) -> LinearTerms:
        """The same terms over the points ``points`` (indices) only."""
        pick = lambda v: v[points] if np.ndim(v) else v  # noqa: E731
        return LinearTerms(self.n_params, [(pick(offset), {j: pick(v) for j, v in coefs.items()})
                                           for offset, coefs in self.given], len(points))

    def astype(self, dtype: Any) -> LinearTerms:
        """A copy evaluated in ``dtype`` (e.g. float32: twice as fast, for a coarse first phase)."""
        out = copy.copy(self)
        out.offsets = [np.asarray(o, dtype) if np.ndim(o) else o for o in self.offsets]
        out.matrix = [m.astype(dtype) for m in self.matrix]
        out.gradient_coefs = [m.astype(dtype) for m in self.gradient_coefs]
        out.pairs = [(k, m, products.astype(dtype), columns) for k, m, products, columns in self.pairs]
        out.hessian_scatter = self.hessian_scatter.astype(dtype)
        out.dtype = np.dtype(dtype)
        return out

    def scale(self) -> np.ndarray:
        """Per parameter, the largest change of a term per unit change of the parameter (Newton's damping
        metric: a unit step in these units moves no term by more than about 1)."""
        out = np.zeros(self.n_params)
        for coefs in self.coefs:
            for j, v in coefs.items():
                out[j] = max(out[j], float(np.max(np.abs(v))))
        return np.where(out > 0, out, 1.0)


class LinearLogSumObjective:
    """``LogSumObjective`` for ``LinearTerms`` with the Hessian: (f, g, H) for a batch of θ.

    With p_k = softmax(t)_k, the residual r = LSE(t) − log L has ∇r = Σ_k p_k·u_k (u_k = ∂t_k/∂θ) and
    ∇²r = Σ_k p_k·u_k·u_kᵀ − ∇r·∇rᵀ (the terms are linear), so with Huber's ψ = clip(r, ±δ) and
    ψ′ = 1{|r| < δ}: H = Σ_i w_i·[(ψ′ − ψ)·∇r·∇rᵀ + ψ·Σ_k p_k·u_k·u_kᵀ] (Huber's second derivative where it
    exists, the inner side's at |r| = δ). Every entry is a sum over points of (ψ′ − ψ)·p_k·p_m (+ ψ·p_k when
    k = m) times a product of coefficients: one matrix product per pair of terms.
    """

    def __init__(self, terms: LinearTerms, log_loss: np.ndarray, delta: float = HUBER_DELTA,
                 weights: np.ndarray | None = None, per: int = 1):
        self.terms, self.delta, self.per = terms, delta, per
        self.y = np.asarray(log_loss, terms.dtype)
        self.weights = None if weights is None else np.asarray(weights, terms.dtype)
        self.block = max(1, 12000 // terms.n)

    def __call__(self, theta: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = self.terms.n_params
        f, g, h = np.empty(len(theta)), np.empty(theta.shape), np.empty((len(theta), p * p))
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing exp is redone shifted
            for i in range(0, len(theta), self.block):
                part = slice(i, i + self.block)
                f[part], g[part], h[part] = self._block(theta[part], rows[part])
        return f, g, h.reshape(-1, p, p)

    def _block(self, theta: np.ndarray, rows: np.ndarray, shift: bool = False) -> tuple[np.ndarray, ...]:
        terms = self.terms.values(theta)
        top = _lse_max(terms) if shift else 0.0  # unshifted unless that over- or underflows
        parts = [np.exp(t - top) if shift else np.exp(t, out=t) for t in terms]
        total = _total(parts)
        r = np.log(total)
        r -= self.y if self.y.ndim == 1 else self.y[rows // self.per]
        if shift:
            r += top
        c = np.clip(r, -self.delta, self.delta)  # ψ(r); Huber(r) = ψ·(r − ψ/2)
        w = None if self.weights is None else self.weights[rows // self.per]
        if w is None:
            f = np.einsum("ij,ij->i", c, r) - 0.5 * np.einsum("ij,ij->i", c, c)
        else:
            f = np.einsum("ij,ij,ij->i", w, c, r) - 0.5 * np.einsum("ij,ij,ij->i", w, c, c)
        bad = ~np.isfinite(f)  # a residual over- or underflowed (ψ·r is then ±inf or NaN)
        if bad.any() and not shift:  # these problems again with the max-shifted LSE
            b, p = len(theta), self.terms.n_params
            out = (np.empty(b), np.empty((b, p)), np.empty((b, p * p)))
            for sel, again in ((~bad, False), (bad, True)):
                if sel.any():
                    for whole, value in zip(out, self._block(theta[sel], rows[sel], again), strict=True):
                        whole[sel] = value
            return out
        s = (c == r) - c  # ψ′ − ψ
        if w is not None:
            c *= w
            s *= w
        inv = np.reciprocal(total, out=total)
        prob = [np.multiply(part, inv, out=part) if part.shape == inv.shape else part * inv
                for part in parts]  # p_k, (b, n)
        cp = [c * pk for pk in prob]  # ψ·p_k: the gradient's weight of term k
        sp = [s * pk for pk in prob]
        g = np.zeros(theta.shape)
        for j, coefs, q in zip(self.terms.index, self.terms.gradient_coefs, cp, strict=True):
            g[:, j] += q @ coefs
        sums = np.empty((len(theta), len(self.terms.hessian_scatter)))
        for k, m, products, columns in self.terms.pairs:
            if k == m:
                weight = sp[k] * prob[k]
                weight += cp[k]
            else:
                weight = sp[k] * prob[m]
            sums[:, columns] = weight @ products
        return f, g, sums @ self.terms.hessian_scatter


@dataclass(frozen=True)
class Solution:
    """Best parameters per problem (R, p), their objective and convergence (R,), and the distinct best end
    points of the first problem (warm starts for bootstrap refits)."""

    x: np.ndarray
    fun: np.ndarray
    converged: np.ndarray
    candidates: np.ndarray


def solve(terms: Terms | LinearTerms, log_loss: np.ndarray, starts: np.ndarray, free: np.ndarray, *,
          weights: np.ndarray | None = None, delta: float = HUBER_DELTA, polish: bool = False,
          precise: bool = False) -> Solution:
    """Minimise the log-space Huber objective from every start, for every problem, in one batched run.

    Problems are the rows of ``weights`` and/or of a 2-D ``log_loss`` (one problem if neither); ``starts`` is
    (S, p), shared, or (R, S, p), per problem. ``LinearTerms`` (Chinchilla) run by damped Newton with the
    analytic Hessian (``scaling.optimize.newton``) to a 1e-10 relative decrease. A grid of starts (not
    ``precise``) is pruned by PRUNE and takes its first PRUNE.until steps in single precision over at most
    COARSE_POINTS of the points (thousands of starts far from any minimum; the survivors go on in double
    precision over all points); its warm starts for bootstrap refits
    (``candidates``) are the distinct basins within PRUNE.last of the best. Other terms run by batched L-BFGS
    with scipy's L-BFGS-B tolerances for at most GRID_ITERATIONS steps, or with ``precise`` (warm starts:
    bootstrap refits, profiles) to a 1e-10 relative decrease. ``polish`` (point fits) then runs the first
    problem's best distinct end points on to convergence and the best of them to the precision of the
    arithmetic.
    """
    n_prob = max(1 if weights is None else len(weights), 1 if log_loss.ndim == 1 else len(log_loss))
    starts = np.broadcast_to(starts, (n_prob, *starts.shape[-2:]))
    n_start = starts.shape[1]
    x0 = starts.reshape(-1, starts.shape[-1])
    linear = isinstance(terms, LinearTerms)
    with np.errstate(all="ignore"):
        if linear:
            grid = {} if precise else {"prune": PRUNE, "coarse": (_coarse(terms, log_loss, delta, weights, n_start),
                                                                  PRUNE.until)}
            res = newton(LinearLogSumObjective(terms, log_loss, delta, weights, per=n_start), x0, free=free,
                         scale=terms.scale(), groups=np.repeat(np.arange(n_prob), n_start), **grid)
        else:
            tolerances = {"ftol": 1e-10, "fatol": 0.0, "gtol": 0.0} if precise else {"max_iter": GRID_ITERATIONS}
            res = lbfgs(LogSumObjective(terms, log_loss, delta, weights, per=n_start), x0, free=free, **tolerances)
    fun = np.where(np.isfinite(res.fun), res.fun, np.inf).reshape(n_prob, n_start)
    best = np.arange(n_prob) * n_start + fun.argmin(axis=1)
    kept = np.ones(n_start, bool)
    if linear:  # warm starts from the basins not clearly dominated (PRUNE's rule) only
        kept = ~res.pruned[:n_start] & (fun[0] <= PRUNE.last * fun[0].min())
    candidates = _distinct(res.x[:n_start][kept], fun[0][kept])
    x, f, ok = res.x[best], res.fun[best], res.converged[best]
    if polish and np.isfinite(fun[0]).any():
        first = None if weights is None else np.repeat(weights[:1], len(candidates), axis=0)
        y = log_loss if log_loss.ndim == 1 else log_loss[0]
        with np.errstate(all="ignore"):
            if linear:  # on until a step gains nothing above rounding
                fine = newton(LinearLogSumObjective(terms, y, delta, first), candidates, free=free,
                              scale=terms.scale(), ftol=1e-15)
                i = j = int(np.argmin(np.where(np.isfinite(fine.fun), fine.fun, np.inf)))
                last = fine
            else:
                objective = LogSumObjective(terms, y, delta, first)
                fine = lbfgs(objective, candidates, free=free)  # to convergence by scipy's rules
                i = int(np.argmin(np.where(np.isfinite(fine.fun), fine.fun, np.inf)))
                # then the best alone to a 1e-12 relative decrease (1e-18 per run: below float64 log residuals)
                last = lbfgs(objective, fine.x[i:i + 1], free=free, ftol=1e-12,
                             fatol=1e-18 * log_loss.shape[-1], gtol=0.0)
                j = 0
        if last.fun[j] <= f[0]:
            x[0], f[0], ok[0] = last.x[j], last.fun[j], ok[0] or fine.converged[i]
            candidates = np.vstack([last.x[j], candidates])
    return Solution(x=x, fun=f, converged=ok & np.isfinite(f), candidates=candidates[:KEEP])


def _coarse(terms: LinearTerms, log_loss: np.ndarray, delta: float, weights: np.ndarray | None,
            per: int) -> LinearLogSumObjective:
    """A Newton grid's objective for its first steps, which only steer and prune the starts: in single precision,
    over at most COARSE_POINTS points evenly spaced through the data (thousands of starts times every point of a
    200,000-run file would take most of the fit)."""
    if terms.n > COARSE_POINTS:
        points = np.linspace(0, terms.n - 1, COARSE_POINTS).round().astype(int)
        terms, log_loss = terms.subset(points), log_loss[..., points]
        weights = None if weights is None else weights[:, points]
    return LinearLogSumObjective(terms.astype(np.float32), log_loss, delta, weights, per=per)


def _distinct(x: np.ndarray, fun: np.ndarray) -> np.ndarray:
    """The best finite end point and up to KEEP − 1 next best from other basins (differing by about 1 in a
    log-coefficient or an exponent): warm starts that let the bootstrap refits of a weakly identified law move
    between its near-equivalent optima instead of staying in the point estimate's."""
    seen, out = set(), []
    for i in np.argsort(fun):
        if not np.isfinite(fun[i]) or len(out) == KEEP:
            break
        key = tuple(np.round(x[i]))
        if key not in seen:
            seen.add(key)
            out.append(x[i])
    return np.array(out) if out else x[:1]
