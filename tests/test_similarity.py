"""Per-token loss similarity: r² and its bootstrap interval on constructed cases, checkpoint matching, pair kinds,
and the command through a real DuckDB store."""

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling.config import load_sweep, parse_sweep
from scaling.grid import plan
from scaling.similarity import (
    bootstrap_pearson,
    match_checkpoints,
    pair_kind,
    pair_similarity,
    r2,
    similarity_command,
    similarity_table,
)
from scaling.store import StoreError, connect, ingest_run, register_plan

ROOT = Path(__file__).resolve().parents[1]
SCALING = shutil.which("scaling") or str(Path(sys.executable).parent / "scaling")


def test_identical_runs_have_r2_one():
    a = np.random.default_rng(0).gamma(2.0, 1.0, 3000)
    result = pair_similarity(a, a.copy(), n_boot=100, seed=0)
    assert result["r2"] == pytest.approx(1) and result["spearman"] == pytest.approx(1)
    assert result["r2_lo"] == pytest.approx(1) and result["r2_hi"] == pytest.approx(1)


def test_independent_noise_has_r2_near_zero_within_interval():
    rng = np.random.default_rng(1)
    result = pair_similarity(rng.normal(size=4000), rng.normal(size=4000), n_boot=300, seed=0)
    assert result["r2_lo"] == 0 <= result["r2"] <= result["r2_hi"] < 0.01
    assert abs(result["spearman"]) < 0.05


def test_linear_mixture_matches_analytic_r2():
    rng = np.random.default_rng(2)
    n, var_x, var_a, var_b = 5000, 1.0, 1.0, 0.5
    x = rng.normal(0, np.sqrt(var_x), n)
    a, b = x + rng.normal(0, np.sqrt(var_a), n), x + rng.normal(0, np.sqrt(var_b), n)
    expected = var_x**2 / ((var_x + var_a) * (var_x + var_b))
    result = pair_similarity(a, b, n_boot=300, seed=0)
    assert result["r2_lo"] <= expected <= result["r2_hi"]
    assert result["r2_hi"] - result["r2_lo"] < 0.1
    assert result["r2"] == pytest.approx(r2(a, b)) == pytest.approx(np.corrcoef(a, b)[0, 1] ** 2)


def test_batched_bootstrap_equals_explicit_resamples():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=200), rng.normal(size=200)
    a = a + 0.5 * b
    idx = np.random.default_rng(7).integers(0, 200, size=(20, 200))  # the same index matrix the module draws
    assert bootstrap_pearson(a, b, 20, 7) == pytest.approx([np.corrcoef(a[i], b[i])[0, 1] for i in idx])
    with pytest.raises(ValueError, match="same positions"):
        pair_similarity(a, b[:100])


def checkpoints(run_id, steps, eval_losses, losses, batch_tokens=256):
    return pd.DataFrame({"run_id": run_id, "step": steps, "tokens": [s * batch_tokens for s in steps],
                         "eval_loss": eval_losses, "losses": list(losses)})


def test_match_by_tokens_skips_unmatched_checkpoints():
    a = checkpoints("a", [16, 32, 64, 100], [3.0, 2.5, 2.2, 2.0], np.zeros((4, 3)))
    b = checkpoints("b", [16, 32, 64, 90], [3.1, 2.6, 2.3, 2.1], np.zeros((4, 3)))
    assert match_checkpoints(a, b, "tokens") == [(0, 0), (1, 1), (2, 2)]
    assert match_checkpoints(a, checkpoints("c", [16, 64], [3, 2], np.zeros((2, 3)), 512), "tokens") == [(1, 0)]
    with pytest.raises(ValueError, match="match must be"):
        match_checkpoints(a, b, "steps")


def test_match_by_loss_takes_nearest_eval_loss_and_reports_gap():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 500))
    arrays = pd.concat([
        checkpoints("a", [16, 32, 64], [3.0, 2.5, 2.0], x[:3] + 0.5 * rng.normal(size=(3, 500))),
        checkpoints("b", [16, 32, 64, 128], [3.3, 2.45, 2.2, 1.95], x + 0.5 * rng.normal(size=(4, 500)))])
    runs = pd.DataFrame({"run_id": ["a", "b"], "n_experts": [1, 8], "params": [100, 400], "seed": [0, 0]})
    table = similarity_table(arrays, runs, match="loss", n_boot=50)
    assert list(table.step_a) == [16, 32, 64] and list(table.step_b) == [16, 32, 128]
    assert table.loss_gap.to_numpy() == pytest.approx([0.3, -0.05, -0.05])
    assert (table.kind == "dense–MoE").all() and table.same_seed.all()
    assert similarity_table(arrays, runs, run_ids=["a"]).empty
    by_tokens = similarity_table(arrays, runs, match="tokens", n_boot=50)
    assert list(by_tokens.step_b) == [16, 32, 64] and by_tokens.loss_gap.to_numpy() == pytest.approx([.3, -.05, .2])
    assert ((by_tokens.r2_lo <= by_tokens.r2) & (by_tokens.r2 <= by_tokens.r2_hi)).all()
    assert by_tokens.r2.between(0.5, 0.9).all()  # true r² = 1 / 1.25² = 0.64


def store_sweep():
    """Two sizes x {dense, 4 experts} x seeds 0, 1: eight runs."""
    return parse_sweep({"name": "sim", "budgets": [1e11], "unique_tokens": 1_000_000, "context": 32,
                        "min_steps": 10, "sparsity": {"experts": [1, 4]}, "sizes": {"count": 2, "span": 2.0},
                        "train": {"batch_size": 8}, "seeds": [0], "repeat": {"seeds": [1]}})


def test_pair_kinds_from_planned_runs():
    runs = plan(store_sweep()).runs
    assert len(runs) == 8
    moe = runs.n_experts > 1
    kinds = {}
    for (_, a), (_, b) in combinations(runs.iterrows(), 2):
        same_size = a.active_params == b.active_params or abs(a.active_params / b.active_params - 1) < 0.05
        key = (int(moe[a.name]) + int(moe[b.name]), same_size, a.seed == b.seed)
        kinds.setdefault(key, set()).add(pair_kind(a, b))
    assert kinds[(0, True, False)] == {"dense–dense (other seed)"}
    assert kinds[(0, False, True)] == kinds[(0, False, False)] == {"dense–dense (other size)"}
    assert kinds[(1, True, True)] == kinds[(1, False, False)] == {"dense–MoE"}
    assert kinds[(2, True, False)] == {"MoE–MoE (other seed)"}
    assert kinds[(2, False, True)] == {"MoE–MoE (other config)"}
    # without a spec the config columns decide
    dense = {"n_experts": 1, "top_k": 1, "d_model": 64, "n_layers": 2, "params": 1000, "lr": 3e-3, "seed": 0}
    assert pair_kind(dense, {**dense, "seed": 1}) == "dense–dense (other seed)"
    assert pair_kind(dense, {**dense, "lr": 1e-3}) == "dense–dense (other config)"
    assert pair_kind(dense, {**dense, "n_layers": 3, "params": 2000}) == "dense–dense (other size)"
    assert pair_kind({**dense, "n_experts": 8}, {**dense, "n_experts": 8, "top_k": 2}) == "MoE–MoE (other config)"


# ---------------------------------------------------------------------------------------------- through the store


def fake_run(run_dir, row, difficulty, rng):
    """Result files of a finished run: per-token losses = shared difficulty (weight growing with training) + noise
    specific to the run; checkpoints at the shared steps 16, 32, 64 plus the run's own final step."""
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = np.array([16, 32, 64, row.steps])
    weight = np.linspace(0.5, 2.0, len(steps))[:, None]
    losses = (2 + weight * difficulty + rng.normal(size=(len(steps), difficulty.size))).astype(np.float32)
    np.savez(run_dir / "token_losses.npz", steps=steps, tokens=steps * 256, eval_loss=losses.mean(1), losses=losses)
    (run_dir / "result.json").write_text(json.dumps({
        "run_id": row.run_id, "status": "ok", "steps": int(row.steps), "final_eval_loss": float(losses[-1].mean()),
        "final_train_loss": float(losses[-1].mean()), "router": [],
        "metrics": [{"step": int(row.steps), "train_loss": float(losses[-1].mean())}]}))


def store_with(tmp_path, n_runs: int | None, difficulty: np.ndarray, rng: np.random.Generator):
    """The similarity sweep planned into a store, the first ``n_runs`` (None: all) with run files, ingested."""
    db = tmp_path / "r.duckdb"
    con = connect(db)
    sweep = store_sweep()
    runs = plan(sweep).runs
    register_plan(con, sweep, runs, tmp_path / "runs")
    for row in list(runs.itertuples())[:n_runs]:
        fake_run(tmp_path / "runs" / row.run_id, row, difficulty, rng)
        ingest_run(con, tmp_path / "runs" / row.run_id)
    con.close()
    return db, runs


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(5)
    return store_with(tmp_path, None, rng.gamma(2.0, 1.0, 2048), rng)


def test_similarity_command_writes_table_and_figures(store, tmp_path, capsys):
    db, runs = store
    out = tmp_path / "report"
    frame = similarity_command(str(db), "sim", [], "tokens", 50, out, "csv")
    stdout = capsys.readouterr().out
    printed = pd.read_csv(io.StringIO(stdout))
    saved = pd.read_csv(out / "similarity.csv")
    # 8 runs: 28 pairs at the 3 shared checkpoints; the 4 other-seed pairs also share their final one
    assert len(printed) == len(saved) == len(frame) == 28 * 3 + 4
    assert list(saved.columns[:3]) == ["run_a", "run_b", "kind"]
    finals = saved[~saved.step_a.isin([16, 32, 64])]
    assert len(finals) == 4 and finals.kind.str.endswith("(other seed)").all()
    assert (saved.tokens_a == saved.tokens_b).all()
    assert (saved.r2_lo <= saved.r2).all() and (saved.r2 <= saved.r2_hi).all()
    assert set(saved.kind) == {"dense–dense (other seed)", "dense–dense (other size)", "dense–MoE",
                               "MoE–MoE (other seed)", "MoE–MoE (other config)"}
    # losses share a difficulty term whose weight grows: r² rises through training
    assert saved[saved.step_a <= 64].groupby("step_a").r2.mean().is_monotonic_increasing
    for suffix in ("png", "svg"):
        assert (out / "figures" / f"similarity.{suffix}").stat().st_size > 1000

    subset = list(runs.run_id[:2])
    by_loss = similarity_command(str(db), "sim", subset, "loss", 20, tmp_path / "two", "json")
    assert len(json.loads(capsys.readouterr().out)) == len(by_loss) == 4  # every checkpoint of run A
    assert set(by_loss.run_a) | set(by_loss.run_b) == set(subset)
    with pytest.raises(StoreError, match="not in sweep"):
        similarity_command(str(db), "sim", ["nope"], "tokens", 20, tmp_path / "x", "csv")


def cli_errors_ready() -> bool:
    """The CLI's one-line error handler imports scaling.data and scaling.laws (other modules of the pipeline)."""
    return all(importlib.util.find_spec(m) for m in ("scaling.data", "scaling.laws"))


@pytest.mark.skipif(not cli_errors_ready(), reason="the CLI's error handler needs scaling.data and scaling.laws")
def test_cli_needs_two_runs_with_token_losses(tmp_path):
    db, _ = store_with(tmp_path, 1, np.ones(64), np.random.default_rng(0))
    done = subprocess.run([SCALING, "similarity", "sim", "--db", str(db), "--format", "csv", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == ("error: sweep 'sim' has 1 run(s) with per-token losses; similarity needs at "
                                   "least 2 (train more, e.g. `scaling run sweeps/similarity.toml`)")


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("scaling.train") is None, reason="needs the trainer (scaling.train)")
def test_similarity_sweep_end_to_end(tmp_path):
    """Train a reduced sweeps/similarity.toml (tiny budget, few eval positions) and compare its runs."""
    from scaling.sweep import execute_sweep

    prepare = pytest.importorskip("scaling.data").prepare

    sweep = load_sweep(ROOT / "sweeps" / "similarity.toml")
    sweep = replace(sweep, name="similarity-e2e", budgets=(1e11,), min_steps=50,
                    train=replace(sweep.train, batch_size=8, eval_tokens=2048, token_loss_tokens=2048))
    assert len(plan(sweep).runs) == 8  # at this budget the two size targets still give two shapes
    prepare(sweep.corpus, sweep.tokenizer, sweep.vocab_size)
    db = tmp_path / "r.duckdb"
    # one thread each: 2-thread torch stalls on a busy VM
    execute_sweep(sweep, str(db), tmp_path / "runs", executor="local", options={"workers": 2})
    frame = similarity_command(str(db), sweep.name, [], "tokens", 50, tmp_path / "report", "csv")
    assert {"dense–MoE", "MoE–MoE (other seed)", "dense–dense (other seed)", "dense–dense (other size)"} <= set(
        frame.kind)
    assert frame.r2.between(0, 1).all() and (tmp_path / "report" / "figures" / "similarity.png").exists()
