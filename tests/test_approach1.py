"""Chinchilla approach 1 from training curves: a known exponent recovered, the store's curves, the trainer's."""

import importlib.util
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling.approach1 import CurveEnvelope, curves_sql, fit_curves, fit_sweep_curves
from scaling.ingest import ingest_file
from scaling.laws import FitError
from scaling.store import connect, literal

ROOT = Path(__file__).resolve().parents[1]
LAW = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al.'s approach 3 fit
A_TRUE = LAW["beta"] / (LAW["alpha"] + LAW["beta"])  # N* ∝ C^a with a = β/(α+β) = 0.452


def synthetic_curves(seed: int = 0, sizes: int = 16, noise: float = 0.002) -> pd.DataFrame:
    """Curves of 16 sizes from 1e7 to 1e10 params, each to 1,000 tokens per parameter, loss from ``LAW`` at every
    point (each point as if its own run: a schedule with no cooldown penalty), log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(np.geomspace(1e7, 1e10, sizes)):
        d = np.geomspace(n, 1000 * n, 60)
        loss = (LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]) * np.exp(
            rng.normal(0, noise, len(d)))
        rows.append(pd.DataFrame({"run_id": f"r{i}", "params": n, "active_params": n, "tokens": d, "loss": loss}))
    return pd.concat(rows, ignore_index=True)


def test_a_known_exponent_is_recovered_within_its_interval():
    model = CurveEnvelope(bootstrap=100).fit(synthetic_curves())
    lo, hi = model.ci_["a"]
    assert lo < A_TRUE < hi and hi - lo < 0.15
    assert model.params_["a"] == pytest.approx(A_TRUE, abs=0.02)
    assert model.params_["a"] + model.params_["b"] == pytest.approx(1, abs=1e-6)  # C = 6ND on the envelope
    env = model.envelope_
    assert (np.diff(env["loss"]) <= 1e-2).all()  # the envelope falls with compute (up to the noise)
    assert np.allclose(env["C"], 6 * env["N"] * env["D"], rtol=1e-6)
    inner = env[~env["edge"]]
    # bigger budgets, bigger best runs (neighbouring sizes swap places near their crossing, within the noise)
    assert np.corrcoef(np.log(inner["C"]), np.log(inner["N"]))[0, 1] > 0.98


def test_too_few_sizes_is_an_error():
    curves = synthetic_curves()
    with pytest.raises(FitError, match="3 or more model sizes"):
        CurveEnvelope().fit(curves[curves["run_id"].isin(["r0", "r1"])])
    with pytest.raises(FitError, match="one sparsity"):
        fit_curves(curves.assign(sparsity=np.where(curves["run_id"] == "r0", 0.5, 0.0)), "curves")


def test_ingested_curves_fit_from_the_store(tmp_path):
    curves = synthetic_curves(sizes=10, noise=0.0)
    runs = curves.groupby("run_id", as_index=False).last()
    runs[["run_id", "params", "tokens", "loss"]].to_csv(tmp_path / "runs.csv", index=False)
    curves.rename(columns={"run_id": "run"})[["run", "tokens", "loss"]].to_csv(tmp_path / "curves.csv", index=False)
    db = tmp_path / "r.duckdb"
    ingest_file(db, tmp_path / "runs.csv", "ext", key="run_id", curves=tmp_path / "curves.csv")
    stored = fit_sweep_curves(db, "ext", bootstrap=20)
    direct = fit_curves(curves, "curves", bootstrap=20)
    assert stored["params"]["a"] == pytest.approx(direct["params"]["a"], rel=1e-6)
    con = connect(db, read_only=True)
    assert con.execute("SELECT law FROM fits").fetchall() == [("approach1",)]
    con.close()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("scaling.train") is None, reason="needs the trainer (scaling.train)")
def test_curves_the_trainer_stores(tmp_path):
    """A small dense sweep trained for real (the demo's shapes, 7 sizes from 1.5k to 84k params, budgets 1e10 and
    3e10): the envelope of its stored eval curves is the lowest interpolated loss of any run at every budget.
    At these budgets one size (3.4k params, ~300 tokens per parameter) is best throughout, so the power law has a
    single interior run to go on and the fit must say so; with a wider span of budgets it must give an exponent."""
    import tomllib

    from scaling.config import parse_sweep
    from scaling.data import prepare
    from scaling.sweep import execute_sweep

    raw = tomllib.loads((ROOT / "sweeps" / "demo.toml").read_text())
    sweep = parse_sweep({**raw, "name": "a1", "unique_tokens": 500_000, "budgets": [1e10, 3e10], "min_steps": 20,
                         "repeat": {},
                         "sparsity": {"experts": [1]}, "sizes": {"count": 5, "span": 25.0},
                         "shape": {**raw["shape"], "min_d_model": 4},
                         "train": {**raw["train"], "eval_tokens": 4096, "token_loss_tokens": 1024,
                                   "checkpoints_per_octave": 2}})
    prepare(sweep.corpus, sweep.tokenizer, sweep.vocab_size)
    db = tmp_path / "r.duckdb"
    execute_sweep(sweep, str(db), tmp_path / "runs", executor="local", options={"workers": 2})
    con = connect(db, read_only=True)
    points = con.execute(curves_sql(literal("a1"))).df()
    con.close()
    assert points["run_id"].nunique() == 10 and (points.groupby("run_id").size() >= 3).all()
    model = CurveEnvelope()
    try:
        result = fit_sweep_curves(db, "a1", bootstrap=50)
    except FitError as e:
        assert "fewer than 2 distinct runs on the envelope away from the sampled extremes" in str(e)
        result = None
    with pytest.raises(FitError) if result is None else nullcontext():
        model.fit(points)
    env = model.envelope_
    log_c = np.log(env["C"].to_numpy())
    by_run = {}
    for run, curve in points.groupby("run_id"):
        c = np.log(curve["flops"].to_numpy())
        order = np.argsort(c)
        inside = (log_c >= c[order][0]) & (log_c <= c[order][-1])
        by_run[run] = np.where(inside, np.interp(log_c, c[order], curve["loss"].to_numpy()[order]), np.inf)
    losses = pd.DataFrame(by_run)
    assert np.allclose(env["loss"], losses.min(axis=1)) and (env["run_id"] == losses.idxmin(axis=1)).all()
    assert env["N"].isin(points["active_params"]).all()
    if result is not None:
        lo, hi = result["ci"]["a"]
        assert 0 < result["params"]["a"] < 1.5 and lo < hi
