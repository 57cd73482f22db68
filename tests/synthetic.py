"""Synthetic sweeps for the store, SQL, plot and report tests: a Chinchilla-like loss law with an interior
optimal sparsity, and a real DuckDB store of runs written as ``scaling.train`` writes them; and isoFLOP runs of a
known finite-data sparsity law for the sparsity-vertex tests."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from scaling.config import parse_sweep
from scaling.grid import plan
from scaling.store import connect, ingest_run, register_plan

SWEEP = {"name": "rep", "budgets": [3e10, 1e11, 3e11], "unique_tokens": 150_000, "context": 32, "min_steps": 10,
         "max_epochs": 50, "sparsity": {"experts": [1, 2, 4, 8]}, "sizes": {"count": 5, "span": 12},
         "shape": {"aspect_ratio": 16, "head_dim": 8, "min_d_model": 16, "rule": "size"}, "train": {"batch_size": 8},
         "repeat": {"seeds": [1], "budgets": [1e11]}}
POSITIONS = 256
SMALL = {**SWEEP, "name": "small", "budgets": [1e11, 3e11], "sparsity": {"experts": [1, 4]}, "sizes": {"count": 3},
         "repeat": {}}


def loss_law(active: np.ndarray, total: np.ndarray, tokens: np.ndarray, unique: float,
             sparsity: np.ndarray | float) -> np.ndarray:
    """Chinchilla-like loss where total params help (N_eff = N·(total/N)^0.4), sparsity costs 0.03/(1 − S) and
    repeated data counts less (Muennighoff et al.'s effective data, R* = 15): an interior optimal sparsity."""
    repeats = np.maximum(tokens / unique - 1, 0)
    effective = np.minimum(tokens, unique) + unique * 15 * (1 - np.exp(-repeats / 15))
    return (1.2 + 50 / (active * (total / active) ** 0.4) ** 0.35 + 150 / effective**0.35
            + 0.03 / (1 - np.asarray(sparsity)))


def write_run(run_dir: Path, run: dict, rng: np.random.Generator, difficulty: np.ndarray,
              status: str = "ok") -> None:
    """A run's result.json and token_losses.npz as ``scaling.train`` writes them, losses from ``loss_law``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = float(loss_law(run["active_params"], run["params"], run["tokens"], run["unique_tokens"], run["sparsity"])
                  + rng.normal(0, 0.01))
    gap = 0.01 * run["epochs"] * (1 + run["sparsity"])
    speed = 2e4 / (1 + 0.3 * run["sparsity"])
    steps = np.unique(np.geomspace(1, run["steps"], 12).astype(int))
    curve = final + (np.log(256) - final) * np.exp(-8 * np.sqrt(steps / run["steps"]))
    tokens = steps * run["tokens"] // run["steps"]
    metrics = [{"step": int(s), "tokens": int(t), "train_loss": float(c - gap), "ce_loss": float(c - gap),
                "aux_loss": 0.01, "z_loss": 0.001, "eval_loss": float(c), "lr": 1e-3, "wall_s": float(t / speed)}
               for s, t, c in zip(steps, tokens, curve, strict=True)]
    router = [{"step": int(s), "tokens": int(t), "layer": layer, "expert": e, "load": float(load[e]),
               "entropy": 1.0, "dropped_frac": 0.0}
              for s, t in zip(steps[::4], tokens[::4], strict=True) for layer in range(run["n_layers"])
              for load in [rng.dirichlet(np.full(run["n_experts"], 5.0 + s))] for e in range(run["n_experts"])
              ] if run["n_experts"] > 1 else []
    ok = status == "ok"
    (run_dir / "result.json").write_text(json.dumps({
        "run_id": run["run_id"], "status": status, "error": None if ok else "RuntimeError: synthetic failure",
        "diverged_step": None, "steps": run["steps"], "tokens_seen": run["tokens"], "epochs_done": run["epochs"],
        "final_train_loss": final - gap if ok else None, "final_eval_loss": final if ok else None,
        "wall_s": run["tokens"] / speed, "train_s": run["tokens"] / speed, "tokens_per_s": speed,
        "flops_per_s": run["flops"] / (run["tokens"] / speed), "started_at": "2026-01-01T00:00:00",
        "finished_at": "2026-01-01T00:01:00", "metrics": metrics if ok else [], "router": router if ok else []}))
    checkpoints = np.arange(len(steps))[-3:]
    losses = np.stack([difficulty * curve[i] / difficulty.mean() + rng.normal(0, 0.3, POSITIONS)
                       for i in checkpoints])
    if ok:
        np.savez(run_dir / "token_losses.npz", steps=steps[checkpoints], tokens=tokens[checkpoints],
                 eval_loss=curve[checkpoints], losses=losses.astype(np.float32))


def build_store(tmp: Path, raw: dict = SWEEP, failed: int = 1) -> Path:
    """Plan ``raw``, write every run's files (the last ``failed`` runs failed), ingest; returns the closed store."""
    sweep = parse_sweep(raw)
    runs = plan(sweep).runs
    db = tmp / f"{sweep.name}.duckdb"
    con = connect(db)
    register_plan(con, sweep, runs, tmp / "runs")
    rng = np.random.default_rng(0)
    difficulty = rng.gamma(2.0, 1.0, POSITIONS)
    for i, run in enumerate(runs.to_dict("records")):
        run_dir = tmp / "runs" / run["run_id"]
        write_run(run_dir, run, rng, difficulty, "failed" if i >= len(runs) - failed else "ok")
        ingest_run(con, run_dir)
    con.close()
    return db


# ---------------------------------------------------------------------------------------- sparsity under finite data

EXPERTS = (1, 2, 4, 8, 16, 32, 64)


def finite_data_law(active: np.ndarray, tokens: np.ndarray, sparsity: np.ndarray, unique: np.ndarray,
                    kappa: float) -> np.ndarray:
    """A known truth for the sparsity-vertex tests: L = 0.8 + 50/(N·(1 − S)^−0.4)^0.35 + 150/D′^0.35, total
    params helping through the effective size N/(1 − S)^0.4, and Muennighoff et al.'s effective data D′ with a
    repetition half-life R* = 15·(1 − S)^κ that shrinks with sparsity (more idle params memorise repeated data
    sooner). With plenty of data the sparsest model wins; with κ > 0 and scarce data an interior sparsity can."""
    r_star = 15.0 * (1 - sparsity) ** kappa
    repeats = np.maximum(tokens / unique - 1, 0)
    effective = np.minimum(tokens, unique) + unique * r_star * (1 - np.exp(-repeats / r_star))
    return 0.8 + 50 / (active * (1 - sparsity) ** -0.4) ** 0.35 + 150 / effective**0.35


def true_vertex(budget: float, sparsity: float, unique: float, kappa: float) -> tuple[float, float]:
    """(N*, L*) of ``finite_data_law`` at C = 6·N·D, on a fine grid of N."""
    n = np.geomspace(1e2, 1e9, 6000)
    loss = finite_data_law(n, budget / (6 * n), np.full(n.size, sparsity), np.full(n.size, unique), kappa)
    return float(n[loss.argmin()]), float(loss.min())


def true_s_star(budget: float, unique: float, kappa: float, s_max: float = 1 - 1 / 64) -> tuple[float, float, float]:
    """(S*, L*(S*), L*(dense)) of the truth over a fine grid of sparsities up to ``s_max``."""
    grid = 1 - 1 / np.geomspace(1, 1 / (1 - s_max), 400)
    losses = np.array([true_vertex(budget, s, unique, kappa)[1] for s in grid])
    return float(grid[losses.argmin()]), float(losses.min()), float(losses[0])


def finite_data_sweep(kappa: float, budgets: tuple[float, ...] = (1e11, 3e11, 1e12),
                      unique: tuple[float, ...] = (1e5, 1e9), experts: tuple[int, ...] = EXPERTS, sizes: int = 5,
                      span: float = 16.0, noise: float = 0.01, seed: int = 0) -> pd.DataFrame:
    """isoFLOP runs of ``finite_data_law`` with Gaussian seed noise: per (U, C, S), ``sizes`` active sizes
    log-spaced over ``span`` around the true N* (shifted by a random factor up to 1.4× either way, as a planned
    grid would be), 2 seeds at the largest budget, 1 elsewhere. Columns as the store's isoflop_points."""
    rng = np.random.default_rng(seed)
    rows = []
    for u, c, e in itertools.product(unique, budgets, experts):
        s = 1 - 1 / e
        n_star = true_vertex(c, s, u, kappa)[0] * 1.4 ** rng.uniform(-1, 1)
        for n in np.geomspace(n_star / span**0.5, n_star * span**0.5, sizes):
            tokens = c / (6 * n)
            for run_seed in (0, 1) if c == max(budgets) else (0,):
                loss = finite_data_law(np.array(n), np.array(tokens), np.array(s), np.array(u), kappa)
                rows.append({"run_id": f"u{u:g}-c{c:g}-e{e}-n{n:.0f}-s{run_seed}", "budget": c, "flops": c,
                             "active_params": n, "params": n * e, "tokens": tokens, "unique_tokens": u,
                             "epochs": tokens / u, "sparsity": s, "seed": run_seed,
                             "loss": float(loss) + rng.normal(0, noise)})
    return pd.DataFrame(rows)
