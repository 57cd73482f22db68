"""Synthetic sweeps for the store, SQL, plot and report tests: a Chinchilla-like loss law with an interior
optimal sparsity, and a real DuckDB store of runs written as ``scaling.train`` writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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
