"""Batched minimisers: many independent unconstrained minimisations advanced together.

Every problem in a batch keeps its own iterate and state, but each step is one vectorised call of the
objective on all problems still running, so thousands of starts (or bootstrap resamples) cost a few hundred
array operations instead of thousands of Python-level optimiser runs.

- ``newton``: damped Newton (Levenberg–Marquardt-style) with the objective's analytic Hessian, for small
  problems (a handful of parameters): each step solves (H + λ·D²)s = −g by a Cholesky factorisation written
  out over the batch (the 5×5 systems of thousands of problems in a few dozen array operations), the damping λ
  adapted per problem from the ratio of actual to predicted decrease (Nielsen 1999; Madsen, Nielsen & Tingleff
  2004, "Methods for non-linear least squares problems", §3.2). Optional pruning drops starts that are
  clearly dominated by the best start of their problem (``Prune``).
- ``lbfgs``: Nocedal & Wright's two-loop L-BFGS with a backtracking Armijo line search (safeguarded quadratic
  interpolation), for objectives with a gradient only; its default stopping rules are scipy's L-BFGS-B ones
  (a step lowers f by at most ftol·max(|f|, 1), or the largest gradient component is at most ``gtol``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Objective = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``fun(x, rows) -> (f, g)``: values (b,) and gradients (b, p) at ``x`` (b, p) of the problems ``rows``."""
HessianObjective = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""``fun(x, rows) -> (f, g, H)``: as ``Objective``, with the Hessians (b, p, p)."""

ARMIJO = 1e-4
PROGRESS_EVERY = 10.0  # seconds between progress lines of a long minimisation (logged; the CLI shows them)
LOG = logging.getLogger(__name__)
EPS = np.finfo(float).eps


@dataclass(frozen=True)
class BatchResult:
    """Final iterates (B, p), values (B,), gradients (B, p), iterations (B,), and whether each problem stopped
    by a tolerance or because no step could lower it further (``converged``) rather than by ``max_iter``."""

    x: np.ndarray
    fun: np.ndarray
    grad: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    pruned: np.ndarray | None = None
    """``newton`` only: the starts dropped as dominated (left where they were, neither converged)."""


@dataclass(frozen=True)
class Prune:
    """When ``newton`` drops a start: from step ``after`` on, a start whose objective is above ``ratio(step)``
    times the lowest objective among its problem's starts (the same ``groups`` label), unless it is among that
    problem's ``keep`` lowest. The tolerated factor shrinks geometrically from ``first`` at step ``after`` to
    ``last`` at step ``until`` and stays there. The best start of a problem is never dropped, so the best
    objective can only be lost if a start that was behind this clearly would have overtaken every survivor.
    From step ``patience`` on, every start still running behind its problem's best is dropped too (a slow start
    in the same basin as the best one would only arrive at the same point)."""

    after: int = 2
    until: int = 5
    first: float = 10.0
    last: float = 2.0
    keep: int = 32
    patience: int = 40

    def ratio(self, step: int) -> float:
        progress = min(max((step - self.after) / max(self.until - self.after, 1), 0.0), 1.0)
        return self.first * (self.last / self.first) ** progress


def newton(fun: HessianObjective, x0: np.ndarray, *, free: np.ndarray | None = None,
           scale: np.ndarray | None = None, groups: np.ndarray | None = None, prune: Prune | None = None,
           coarse: tuple[HessianObjective, int] | None = None, max_iter: int = 500, ftol: float = 1e-10,
           fatol: float = 0.0, radius: float = 1.0) -> BatchResult:
    """Minimise ``fun`` from every row of ``x0`` (B, p) by damped Newton; coordinates with ``free[j] = False``
    stay at x0.

    A step solves (H + λ·D²)s = −g, D = diag(``scale``) (the size of a unit step in each coordinate, e.g. how
    far it moves the model's log-terms). λ starts where the step is at most ``radius`` long in D-units and
    adapts per problem (Nielsen's rule: a step is taken when it lowers f, λ shrinks by up to 3x after a
    well-predicted step, and doubles ever faster after failures); where H + λD² is not positive definite λ
    grows until it is, so a saddle or a concave region is left downhill. One call of ``fun`` per step on all
    running problems: a rejected step costs no more than an accepted one.

    A problem stops (converged) when a step lowers f by at most max(ftol·|f|, fatol), when the model predicts
    no decrease above the rounding of f, or when no damping gives a lower f; else after ``max_iter`` steps.
    With ``prune``, starts that are clearly dominated within their group are dropped (``pruned``).
    ``coarse = (cheaper_fun, steps)``: the first ``steps`` steps evaluate ``cheaper_fun`` (e.g. the objective in
    single precision, while thousands of starts are still far from any minimum) and decide nothing but the
    steps and the pruning; then the running problems are evaluated again with ``fun`` and go on with it.
    """
    x = np.array(x0, dtype=float, copy=True)
    n_prob, dim = x.shape
    mask = np.ones(dim, bool) if free is None else np.asarray(free, bool)
    d2 = (np.ones(dim) if scale is None else np.asarray(scale, float)) ** 2
    group = np.zeros(n_prob, int) if groups is None else np.asarray(groups)
    cheap, cheap_steps = coarse if coarse is not None else (fun, 0)
    f, g, h = (cheap if cheap_steps else fun)(x, np.arange(n_prob))
    f = np.where(np.isfinite(f), f, np.inf)
    n_iter = np.zeros(n_prob, int)
    converged = np.zeros(n_prob, bool)
    pruned = np.zeros(n_prob, bool)
    idx = np.flatnonzero(np.isfinite(f) & np.isfinite(g).all(axis=1) & np.isfinite(h).all(axis=(1, 2)))
    X, F = x[idx], f[idx]
    G, H = _masked(g[idx], h[idx], mask)
    lam = np.full(len(idx), np.nan)
    nu = np.full(len(idx), 2.0)
    clock = time.monotonic()
    for it in range(max_iter):
        if it == cheap_steps > 0 and len(idx):  # on in full precision from here
            f_full, g_full, h_full = fun(X, idx)
            fine = np.isfinite(f_full) & np.isfinite(g_full).all(axis=1) & np.isfinite(h_full).all(axis=(1, 2))
            F, (G, H) = f_full, _masked(g_full, h_full, mask)
            x[idx], f[idx], g[idx] = X, np.where(fine, F, np.inf), G
            idx, X, F, G, H, lam, nu = (a[fine] for a in (idx, X, F, G, H, lam, nu))
        if len(idx) == 0:
            break
        if np.isnan(lam).any():  # first step: at most ``radius`` long for a convex model
            new = np.isnan(lam)
            diag = np.diagonal(H[new], axis1=1, axis2=2) / d2
            lam[new] = np.maximum(1e-3 * np.abs(diag).max(axis=1),
                                  np.sqrt((G[new] ** 2 / d2).sum(axis=1)) / radius)
        step, lam = _damped_step(H, G, lam, d2)
        pred = -0.5 * (np.einsum("ij,ij->i", step, G) - lam * np.einsum("ij,ij,j->i", step, step, d2))
        f_new, g_new, h_new = (cheap if it < cheap_steps else fun)(X + step, idx)
        f_new = np.where(np.isfinite(f_new), f_new, np.inf)
        n_iter[idx] += 1
        decrease = F - f_new
        rho = decrease / np.maximum(pred, np.finfo(float).tiny)
        ok = (decrease >= 0) & (rho > 1e-4) & np.isfinite(g_new).all(axis=1) & np.isfinite(h_new).all(axis=(1, 2))
        done = ok & (decrease <= np.maximum(ftol * np.abs(F), fatol))
        done |= ~ok & (pred <= 4 * EPS * np.abs(F))  # nothing left to gain above rounding
        done |= ~ok & (lam > 1e30)  # no step lowers f
        done &= it >= cheap_steps
        X[ok] += step[ok]
        F[ok] = f_new[ok]
        G[ok], H[ok] = _masked(g_new[ok], h_new[ok], mask)
        lam = np.where(ok, lam * np.maximum(1 / 3, 1 - (2 * np.minimum(rho, 1) - 1) ** 3), lam * nu)
        nu = np.where(ok, 2.0, nu * 2)
        x[idx], f[idx], g[idx] = X, F, G
        converged[idx[done]] = True
        clock = progress(clock, "Newton", it, len(idx), f)
        keep = ~done
        if prune is not None and it + 1 >= prune.after:  # against all of the group's starts, finished or not
            late = it + 1 >= prune.patience
            dominated = _dominated(np.where(pruned, np.inf, f), group, 1.0 if late else prune.ratio(it + 1),
                                   1 if late else prune.keep)
            drop = dominated[idx] & keep
            pruned[idx[drop]] = True
            keep &= ~drop
        if not keep.all():
            idx, X, F, G, H, lam, nu = (a[keep] for a in (idx, X, F, G, H, lam, nu))
    return BatchResult(x=x, fun=f, grad=g, n_iter=n_iter, converged=converged, pruned=pruned)


def _masked(g: np.ndarray, h: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and Hessian with frozen coordinates cut out (zero gradient, unit diagonal: no step)."""
    if mask.all():
        return g, h
    g = g * mask
    h = h * (mask[:, None] & mask[None, :])
    h[:, ~mask, ~mask] = 1.0
    return g, h


def _damped_step(h: np.ndarray, g: np.ndarray, lam: np.ndarray,
                 d2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s = −(H + λD²)⁻¹g per problem, λ raised (x4, from at least 1e-10 of the largest scaled curvature)
    where H + λD² is not positive definite."""
    dim = h.shape[1]
    step = np.zeros(g.shape)
    todo = np.arange(len(h))
    floor = 1e-10 * np.abs(np.diagonal(h, axis1=1, axis2=2) / d2).max(axis=1) + 1e-300
    for _ in range(60):
        a = h[todo].copy()
        a[:, np.arange(dim), np.arange(dim)] += lam[todo, None] * d2
        chol, ok = _cholesky(a)
        if ok.any():
            step[todo[ok]] = -_cholesky_solve(chol[ok], g[todo[ok]])
        todo = todo[~ok]
        if todo.size == 0:
            break
        lam[todo] = np.maximum(4 * lam[todo], floor[todo])
    return step, lam


def _cholesky(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower Cholesky factors of a batch of small symmetric matrices (b, p, p), column by column over the
    batch, and whether each is (numerically) positive definite."""
    dim = a.shape[1]
    chol = np.zeros_like(a)
    ok = np.ones(len(a), bool)
    for j in range(dim):
        row = chol[:, j, :j]
        pivot = a[:, j, j] - np.einsum("ij,ij->i", row, row)
        ok &= pivot > 1e-13 * np.abs(a[:, j, j])
        root = np.sqrt(np.where(pivot > 0, pivot, 1.0))
        chol[:, j, j] = root
        if j + 1 < dim:
            chol[:, j + 1:, j] = (a[:, j + 1:, j] - np.einsum("ikj,ij->ik", chol[:, j + 1:, :j], row)) / root[:, None]
    return chol, ok


def _cholesky_solve(chol: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x with L·Lᵀ·x = b, per problem."""
    dim = chol.shape[1]
    y = np.zeros(b.shape)
    for j in range(dim):
        y[:, j] = (b[:, j] - np.einsum("ij,ij->i", chol[:, j, :j], y[:, :j])) / chol[:, j, j]
    x = np.zeros(b.shape)
    for j in reversed(range(dim)):
        x[:, j] = (y[:, j] - np.einsum("ij,ij->i", chol[:, j + 1:, j], x[:, j + 1:])) / chol[:, j, j]
    return x


def _dominated(f: np.ndarray, group: np.ndarray, ratio: float, keep: int) -> np.ndarray:
    """Starts above ``ratio`` times their group's lowest objective and not among its ``keep`` lowest."""
    order = np.lexsort((f, group))
    sorted_group = group[order]
    first = np.r_[0, np.flatnonzero(sorted_group[1:] != sorted_group[:-1]) + 1]
    size = np.diff(np.r_[first, len(f)])
    rank = np.empty(len(f), int)
    rank[order] = np.arange(len(f)) - np.repeat(first, size)
    best = np.repeat(f[order[first]], size)
    lowest = np.empty(len(f))
    lowest[order] = best
    return (rank >= keep) & (f > ratio * lowest)


def lbfgs(fun: Objective, x0: np.ndarray, *, free: np.ndarray | None = None, max_iter: int = 1000,
          memory: int = 10, ftol: float = 2.2e-9, fatol: float = 2.2e-9, gtol: float = 1e-5,
          max_backtracks: int = 40) -> BatchResult:
    """Minimise ``fun`` from every row of ``x0`` (B, p); coordinates with ``free[j] = False`` stay at x0.

    A problem stops when a step lowers f by at most max(ftol·max(|f_k|, |f_k+1|), fatol) (scipy: both
    2.2e-9), when its largest gradient component is at most ``gtol``, or when no Armijo step lowers it (all
    three zero: run to the precision of the arithmetic). Running problems live in a compact working set with
    a shared circular history (a skipped curvature pair leaves an empty slot), so a step copies no history.
    """
    x = np.array(x0, dtype=float, copy=True)
    n_prob, dim = x.shape
    mask = np.ones(dim, bool) if free is None else np.asarray(free, bool)
    f, g = fun(x, np.arange(n_prob))
    g = g * mask
    n_iter = np.zeros(n_prob, int)
    converged = np.isfinite(f) & (np.abs(g).max(axis=1) <= gtol)
    idx = np.flatnonzero(np.isfinite(f) & ~converged)  # the working set
    X, F, G = x[idx], f[idx], g[idx]
    S, Y = np.zeros((len(idx), memory, dim)), np.zeros((len(idx), memory, dim))
    rho, gamma = np.zeros((len(idx), memory)), np.zeros(len(idx))
    live = np.ones(len(idx), bool)
    clock = time.monotonic()
    for it in range(max_iter):
        if not live.any():
            break
        if live.mean() < 0.75:  # compact the working set
            idx, X, F, G, S, Y, rho, gamma = (a[live] for a in (idx, X, F, G, S, Y, rho, gamma))
            live = np.ones(len(idx), bool)
        run = np.flatnonzero(live)
        d = _direction(G, S, Y, rho, gamma, [(it - 1 - j) % memory for j in range(memory)])[run]
        slope = np.einsum("ij,ij->i", G[run], d)
        bad = ~(slope < 0)
        if bad.any():  # not a descent direction: forget the history, take a unit steepest-descent step
            rho[run[bad]], gamma[run[bad]] = 0.0, 0.0
            d[bad] = -G[run[bad]] / np.linalg.norm(G[run[bad]], axis=1, keepdims=True)
            slope[bad] = np.einsum("ij,ij->i", G[run[bad]], d[bad])
        step, f_new, g_new, ok = _line_search(fun, X[run], F[run], d, slope, idx[run], max_backtracks)
        stuck, moved = run[~ok], run[ok]
        converged[idx[stuck]] = np.isfinite(G[stuck]).all(axis=1)  # no Armijo step lowers f: a minimum
        live[stuck] = False
        s_new = step[ok, None] * d[ok]
        y_new = g_new[ok] * mask - G[moved]
        decrease = F[moved] - f_new[ok]
        enough = np.maximum(ftol * np.maximum(np.abs(F[moved]), np.abs(f_new[ok])), fatol)
        X[moved] += s_new
        F[moved], G[moved] = f_new[ok], g_new[ok] * mask
        n_iter[idx[run]] += 1
        sy, yy = np.einsum("ij,ij->i", s_new, y_new), np.einsum("ij,ij->i", y_new, y_new)
        keep = sy > EPS * yy
        slot = it % memory
        rho[run, slot] = 0.0
        S[moved, slot], Y[moved, slot] = s_new, y_new
        rho[moved[keep], slot] = 1.0 / sy[keep]
        gamma[moved[keep]] = sy[keep] / yy[keep]
        stop = (decrease <= enough) | (np.abs(G[moved]).max(axis=1) <= gtol)
        converged[idx[moved[stop]]] = True
        live[moved[stop]] = False
        x[idx[run]], f[idx[run]], g[idx[run]] = X[run], F[run], G[run]
        clock = progress(clock, "L-BFGS", it, int(live.sum()), f)
    return BatchResult(x=x, fun=f, grad=g, n_iter=n_iter, converged=converged)


def progress(since: float, method: str, it: int, active: int, f: np.ndarray) -> float:
    """Log where a minimisation is, at most every PROGRESS_EVERY seconds; returns the time of the last line."""
    now = time.monotonic()
    if now - since < PROGRESS_EVERY:
        return since
    best = np.min(f) if len(f) else np.nan
    LOG.info("%s step %d: %d of %d starts still moving, best objective %.6g", method, it + 1, active, len(f), best)
    return now


def _direction(g: np.ndarray, s: np.ndarray, y: np.ndarray, rho: np.ndarray, gamma: np.ndarray,
               order: list[int]) -> np.ndarray:
    """−H·g by the two-loop recursion over the history slots in ``order`` (newest first); empty slots have
    rho = 0 and drop out. H0 = gamma = s·y/y·y of the newest pair kept, or without one a steepest-descent
    step of unit length (as L-BFGS-B's first step)."""
    q = -g
    alpha = np.zeros(rho.shape)
    for j in order:
        alpha[:, j] = rho[:, j] * np.einsum("ij,ij->i", s[:, j], q)
        q -= alpha[:, j, None] * y[:, j]
    q *= np.where(gamma > 0, gamma, 1.0 / np.maximum(np.linalg.norm(g, axis=1), EPS))[:, None]
    for j in reversed(order):
        beta = rho[:, j] * np.einsum("ij,ij->i", y[:, j], q)
        q += (alpha[:, j] - beta)[:, None] * s[:, j]
    return q


def _line_search(fun: Objective, x: np.ndarray, f: np.ndarray, d: np.ndarray, slope: np.ndarray,
                 rows: np.ndarray, max_backtracks: int) -> tuple[np.ndarray, ...]:
    """Backtracking from a unit step until the Armijo condition holds; ``ok`` is False where none did."""
    step = np.ones(len(x))
    f_new = np.full(len(x), np.inf)
    g_new = np.zeros_like(x)
    ok = np.zeros(len(x), bool)
    todo = np.arange(len(x))
    for _ in range(max_backtracks):
        fv, gv = fun(x[todo] + step[todo, None] * d[todo], rows[todo])
        good = np.isfinite(fv) & (fv <= f[todo] + ARMIJO * step[todo] * slope[todo])
        hit = todo[good]
        f_new[hit], g_new[hit], ok[hit] = fv[good], gv[good], True
        todo = todo[~good]
        if todo.size == 0:
            break
        t, fv = step[todo], fv[~good]
        curve = fv - f[todo] - slope[todo] * t
        quadratic = -slope[todo] * t * t / (2 * np.where(curve > 0, curve, 1))  # minimiser of the interpolant
        trial = np.where(np.isfinite(fv) & (curve > 0), quadratic, 0.1 * t)
        step[todo] = np.clip(trial, 0.1 * t, 0.5 * t)
    return step, f_new, g_new, ok
