"""``scaling predict`` and ``fit --holdout-largest``: predictions by hand, interval coverage, extrapolation."""

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling.fitting import fit_sweep
from scaling.holdout import holdout_fit
from scaling.ingest import ingest_file
from scaling.laws import LAWS, Chinchilla, FitError
from scaling.predict import predict, prediction_table
from scaling.store import StoreError, connect

ROOT = Path(__file__).resolve().parents[1]
SCALING = shutil.which("scaling") or str(Path(sys.executable).parent / "scaling")
CHINCHILLA = ROOT / "data" / "published" / "chinchilla_epoch_svg_extracted.csv"
TRUE = {"E": 1.8, "A": 400.0, "B": 1200.0, "alpha": 0.34, "beta": 0.30}


def true_loss(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def synthetic_runs(rng: np.random.Generator, sigma: float = 0.01, budgets: int = 5) -> pd.DataFrame:
    """An isoFLOP design (6 sizes per budget around 20 tokens per parameter), log-normal noise on the loss."""
    c = np.repeat(np.geomspace(1e17, 1e20, budgets), 6)
    n = np.tile(np.geomspace(0.3, 3, 6), budgets) * np.sqrt(c / 6 / 20)
    d = c / (6 * n)
    return pd.DataFrame({"params": n, "tokens": d, "flops": c, "run_id": [f"r{i}" for i in range(len(n))],
                         "loss": true_loss(n, d) * np.exp(rng.normal(0, sigma, len(n)))})


def test_predict_on_the_epoch_refit_is_the_formula_by_hand(tmp_path):
    db = tmp_path / "e.duckdb"
    ingest_file(db, CHINCHILLA, "chinchilla", columns={"params": "Model Size", "flops": "Training FLOP"})
    fit_sweep(db, "chinchilla", "chinchilla")
    con = connect(db, read_only=True)
    fit_id = con.execute("SELECT fit_id FROM fits").fetchall()[0][0]
    p = dict(con.execute("SELECT parameter, value FROM fit_params WHERE fit_id = ?", [fit_id]).fetchall())
    con.close()
    n, d = 7e10, 1.4e12  # Chinchilla itself
    table, notes = predict(db, fit_id, pd.DataFrame({"params": [n], "tokens": [d]}), bootstrap=30)
    by_hand = p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]
    row = table.iloc[0]
    assert row["loss"] == pytest.approx(by_hand, rel=1e-12)
    # the report's formula, with its printed numbers, gives the same value to its 6 digits
    text = LAWS["chinchilla"].formula(p)
    numbers = [float(x) for x in re.findall(r"[0-9.]+(?:e[+-]?[0-9]+)?", text)]
    e, a, alpha, b, beta = numbers
    assert text == f"L = {e:.6g} + {a:.6g}/N^{alpha:.6g} + {b:.6g}/D^{beta:.6g}"
    assert e + a / n**alpha + b / d**beta == pytest.approx(by_hand, rel=1e-5)
    assert row["pi_lo"] < row["ci_lo"] < row["loss"] < row["ci_hi"] < row["pi_hi"]
    assert any("bootstrap over the fit's 245 runs (30 resamples)" in note for note in notes)
    with pytest.raises(StoreError, match="no fit 'nope'"):
        predict(db, "nope", pd.DataFrame({"params": [n], "tokens": [d]}))
    # the command: CSV rows in, one table out (nothing else on stdout)
    pd.DataFrame({"params": [n, 1e9], "tokens": [d, 2e10]}).to_csv(tmp_path / "points.csv", index=False)
    done = subprocess.run([SCALING, "predict", "--fit", fit_id, "--csv", str(tmp_path / "points.csv"), "--bootstrap",
                           "30", "--db", str(db), "--format", "csv"], capture_output=True, text=True, timeout=300)
    out = pd.read_csv(io.StringIO(done.stdout))
    assert done.returncode == 0 and len(out) == 2 and out["loss"].iloc[0] == pytest.approx(by_hand, rel=1e-9)
    assert list(out.columns[-5:]) == ["loss", "ci_lo", "ci_hi", "pi_lo", "pi_hi"]
    bad = subprocess.run([SCALING, "predict", "--fit", "nope", "--params", "1e9", "--tokens", "2e10", "--db",
                          str(db)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("error: no fit 'nope'") and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1


def test_prediction_intervals_cover_95_percent_of_new_runs():
    """30 synthetic sweeps from a known Chinchilla law with 1% log-normal noise, 10 new runs each drawn anywhere in
    the sampled (N, D) box: the 95% prediction intervals must cover 90–99% of the 300 new losses, the confidence
    intervals 90–99% of the true law's values. Tolerance: for 300 independent draws the binomial sd of the coverage
    is sqrt(.95·.05/300) = 0.013, and the 10 runs of one sweep share its fit (a design effect of up to 10 makes it
    0.04), so [0.90, 0.99] fails an interval that is off by a few points, not the noise of the check."""
    hits, true_hits = [], []
    for k in range(30):
        rng = np.random.default_rng(k)
        runs = synthetic_runs(rng)
        n = np.exp(rng.uniform(*np.log(runs["params"].agg(["min", "max"])), 10))
        d = np.exp(rng.uniform(*np.log(runs["tokens"].agg(["min", "max"])), 10))
        observed = true_loss(n, d) * np.exp(rng.normal(0, 0.01, 10))
        model = Chinchilla(bootstrap=40, seed=k).fit(runs)
        table = prediction_table(model, runs, pd.DataFrame({"params": n, "tokens": d}), seed=k)
        hits += list((table["pi_lo"] <= observed) & (observed <= table["pi_hi"]))
        true_hits += list((table["ci_lo"] <= true_loss(n, d)) & (true_loss(n, d) <= table["ci_hi"]))
    assert 0.90 <= np.mean(hits) <= 0.99
    assert 0.90 <= np.mean(true_hits) <= 0.99


def test_holdout_of_the_largest_budgets():
    runs = synthetic_runs(np.random.default_rng(1), budgets=6)
    result = holdout_fit(runs, "chinchilla", 2, bootstrap=40)
    summary = result["holdout"]["summary"]
    assert summary["n_held_out"] == 12 and summary["n_fitted"] == 24
    assert summary["held_out_budgets"] == pytest.approx(sorted(runs["flops"].unique())[-2:])
    held = pd.DataFrame(result["holdout"]["runs"])
    assert held["budget"].min() >= summary["held_out_budgets"][0]
    assert (held["error"] == held["predicted"] - held["observed"]).all()
    gap = held["observed"] - result["params"]["E"]
    assert summary["max_error_fraction"] == pytest.approx((held["error"].abs() / gap).max())
    # the law is right, so the extrapolation is close: within a few noise sd and mostly covered
    assert summary["mean_abs_error"] < 0.1 and summary["coverage"] >= 0.75
    with pytest.raises(FitError, match="needs at least 7 budgets"):
        holdout_fit(runs, "chinchilla", 5)
    with pytest.raises(FitError, match="predicts new points"):
        holdout_fit(runs, "isoflop", 1)


def test_the_data_constrained_formula_recomputes_by_hand():
    """Muennighoff et al.'s law as the report prints it, evaluated step by step, equals the fitted law."""
    import math

    from scaling.fitting import csv_points
    from scaling.laws import DataConstrained

    frame = csv_points(ROOT / "data" / "published" / "datablations_c4_val_losses_fit182.csv", "data-constrained",
                       {"loss": "val_loss"})
    model = DataConstrained().fit(frame)
    p = model.params_
    text = LAWS["data-constrained"].formula(p)
    assert f"D′ = U_D + U_D·{p['R_D_star']:.6g}·(1 − exp(−R_D/{p['R_D_star']:.6g}))" in text

    def by_hand(n: float, d: float, u: float) -> float:
        u_d = min(u, d)
        d_eff = u_d + u_d * p["R_D_star"] * (1 - math.exp(-(d / u_d - 1) / p["R_D_star"]))
        u_n = min(n, (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / p["alpha"]) * u_d ** (p["beta"] / p["alpha"]))
        n_eff = u_n + u_n * p["R_N_star"] * (1 - math.exp(-(n / u_n - 1) / p["R_N_star"]))
        return p["E"] + p["A"] / n_eff ** p["alpha"] + p["B"] / d_eff ** p["beta"]

    points = pd.DataFrame({"params": [1e9, 8e9, 1e8], "tokens": [1e11, 1e10, 1e9], "unique_tokens": [1e10, 1e9, 1e10]})
    assert model.predict_with(points, p) == pytest.approx([by_hand(*row) for row in points.to_numpy()], rel=1e-12)
