"""Batched L-BFGS: many independent unconstrained minimisations advanced together.

Every problem in the batch keeps its own iterate, gradient, curvature history and step length, but each step
is one vectorised call of the objective on all problems still running, so thousands of starts (or bootstrap
resamples) cost a few hundred array operations instead of thousands of Python-level optimiser runs. The method
is Nocedal & Wright's two-loop L-BFGS with a backtracking Armijo line search (safeguarded quadratic
interpolation); the default stopping rules are scipy's L-BFGS-B ones (a step lowers f by at most
ftol·max(|f|, 1), or the largest gradient component is at most ``gtol``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Objective = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``fun(x, rows) -> (f, g)``: values (b,) and gradients (b, p) at ``x`` (b, p) of the problems ``rows``."""

ARMIJO = 1e-4
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


def minimize(fun: Objective, x0: np.ndarray, *, free: np.ndarray | None = None, max_iter: int = 1000,
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
    return BatchResult(x=x, fun=f, grad=g, n_iter=n_iter, converged=converged)


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
