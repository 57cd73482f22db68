"""The nonparametric sparsity answer on isoFLOP runs of a known finite-data law (tests/synthetic.py)."""

import json

import numpy as np
import pytest
from synthetic import finite_data_sweep, true_s_star, true_vertex

from scaling.fitting import fit_checked
from scaling.laws import FitError, fit_law
from scaling.sparsity_vertex import SparsityVertex, key, refined_argmin

TOP, SCARCE, PLENTY = 1e12, 1e5, 1e9
INTERIOR, CORNER = 0.35, 0.0  # κ of the truth: an interior S* under scarce data, or the sparsest everywhere


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interior_optimum_under_scarce_data_is_found(seed):
    model = SparsityVertex(bootstrap=200, seed=seed).fit(finite_data_sweep(INTERIOR, seed=seed))
    s_true, l_true, l_dense = true_s_star(TOP, SCARCE, INTERIOR)
    assert 0.75 < s_true < 0.95  # the truth is what the test says it is
    s_hat = model.params_["S_star_scarce"]
    regret = true_vertex(TOP, s_hat, SCARCE, INTERIOR)[1] - l_true
    assert regret <= 0.2 * (l_dense - l_true)
    lo, hi = model.ci_["S_star_scarce"]
    assert lo <= s_true <= hi
    plenty_true = true_s_star(TOP, PLENTY, INTERIOR)[0]
    lo, hi = model.ci_["S_star_plenty"]
    assert lo - 1e-9 <= plenty_true <= hi + 1e-9
    assert model.verdict_.startswith("interior optimum under scarce data: S*_scarce < S*_plenty")
    assert model.ci_["S_star_difference"][1] < 0
    # scarce data moves every sparsity's N* up (fewer epochs): the ratio's interval lies above 1 at the sparsest
    assert model.ci_[key("N_star_ratio", C=TOP, S=1 - 1 / 64)][0] > 1


@pytest.mark.parametrize("seed", [0, 1])
def test_no_interior_optimum_is_not_reported_as_one(seed):
    model = SparsityVertex(bootstrap=200, seed=seed).fit(finite_data_sweep(CORNER, seed=seed))
    assert true_s_star(TOP, SCARCE, CORNER)[0] == pytest.approx(1 - 1 / 64)
    assert not model.verdict_.startswith("interior optimum")
    assert model.verdict_.startswith("not resolved by these runs: add runs at sparsities above S = 0.984")
    assert any("sits at the sparsest sampled" in note for note in model.notes_)


def test_law_registry_and_summary():
    result = fit_law(finite_data_sweep(INTERIOR), "sparsity-vertex", bootstrap=50, budget=TOP)
    optimum = result["optimum"]
    assert set(optimum) >= {"S_star_plenty", "S_star_scarce", "S_star_difference"}
    assert all(np.isfinite(v) for v in optimum.values())
    assert result["ci"]["S_star_difference"][0] <= optimum["S_star_difference"] <= result["ci"]["S_star_difference"][1]
    assert key("L_star", SCARCE, TOP, 0.875) in result["params"]
    assert result["notes"][-1].startswith("interior optimum")


def test_refined_argmin_recovers_a_parabola_vertex_and_clips_at_the_edges():
    x = np.log([1, 2, 4, 8, 16])
    y = np.stack([(x - 1.7) ** 2, x, -x, np.where(x > 1, np.nan, x)])
    got = refined_argmin(x, y)
    assert got[0] == pytest.approx(1.7)
    assert got[1] == 0 and got[2] == pytest.approx(x[-1]) and np.isnan(got[3])


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: f[f.unique_tokens == PLENTY], "2 or more unique-token limits U"),
    (lambda f: f.drop(f[(f.sparsity == 0.5) & (f.budget == 1e11)].index[:3]), "an isoFLOP vertex needs 3 or more"),
    (lambda f: f.assign(loss=f.active_params ** -0.1), "none of the .* isoFLOP curves has an interior minimum"),
    (lambda f: f[f.sparsity == 0], "2 or more sparsities"),
])
def test_bad_input_is_one_clear_error(change, message):
    with pytest.raises(FitError, match=message):
        SparsityVertex(bootstrap=10).fit(change(finite_data_sweep(INTERIOR)))


def test_cli_fits_a_csv_and_prints_the_verdict(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    csv = tmp_path / "runs.csv"
    finite_data_sweep(INTERIOR).to_csv(csv, index=False)
    scaling = str(Path(sys.executable).parent / "scaling")
    done = subprocess.run([scaling, "fit", "--csv", str(csv), "--law", "sparsity-vertex", "--bootstrap", "100",
                           "--budget", "1e12", "--format", "json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["notes"][-1].startswith("interior optimum under scarce data")
    one_u = tmp_path / "one.csv"
    finite_data_sweep(INTERIOR, unique=(1e5,)).to_csv(one_u, index=False)
    bad = subprocess.run([scaling, "fit", "--csv", str(one_u), "--law", "sparsity-vertex"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "2 or more unique-token limits" in bad.stderr


def test_sparsity_law_is_cross_checked_against_the_vertices():
    """The truth's repetition half-life shrinks with sparsity, which Abnar et al.'s law (one R_D*) cannot
    express: the check must say where it misses the runs, and the law must have fitted R_D* (several epochs)."""
    result = fit_checked(finite_data_sweep(INTERIOR), "sparsity", bootstrap=0)
    assert any(note.startswith("R_D_star fitted from the runs") for note in result["notes"])
    assert any("misses the best run of" in note or "disagrees with the isoFLOP vertices" in note
               for note in result["notes"])


def test_regime_figures_draw_from_the_fit_and_skip_without_it(tmp_path):
    from scaling import plots

    frame = finite_data_sweep(INTERIOR)
    model = SparsityVertex(bootstrap=30).fit(frame)
    for name, plot in (("isoflop", plots.regime_isoflop_plot(frame, model.vertices_)),
                       ("sparsity", plots.vertex_sparsity_plot(model.vertices_, model.s_star_))):
        png = next(p for p in plots.save(plot, tmp_path / name) if p.suffix == ".png")
        assert png.stat().st_size > 10_000
    assert plots.regime_isoflop_plot(frame, None) is None and plots.vertex_sparsity_plot(None, None) is None
    one_regime = model.vertices_[model.vertices_["regime"] == "plenty"]
    assert plots.regime_isoflop_plot(frame, one_regime) is None


def test_curves_of_three_runs_get_no_verdict():
    """3 runs on 3 sizes: every bootstrap resample is the same curve, so no interval can back a verdict."""
    frame = finite_data_sweep(INTERIOR, sizes=3)
    frame = frame[frame["seed"] == 0]
    model = SparsityVertex(bootstrap=50).fit(frame)
    assert model.verdict_.startswith("not resolved by these runs: add runs at C = 1e12 (a second seed")


def test_vertex_near_the_minimum_is_less_biased_than_a_parabola_through_every_size():
    """Noiseless runs of the known law over a 20x span of sizes: the curve is asymmetric in log N, so a parabola
    through all 5 sizes misses the true minimum loss; the one through the sizes nearest the minimum does not."""
    from scaling.laws import _parabolas
    from scaling.sparsity_vertex import near_minimum

    frame = finite_data_sweep(INTERIOR, span=20.0, noise=0.0, budgets=(TOP,), unique=(PLENTY, SCARCE))
    model = SparsityVertex().fit(frame)
    log_n, loss = np.log10(frame["active_params"].to_numpy()), frame["loss"].to_numpy()
    cells = frame.groupby(["unique_tokens", "sparsity"]).ngroup().to_numpy()
    W = np.ones((1, len(frame)))
    every = _parabolas(log_n, loss, cells, cells.max() + 1, W)["value"][0]
    local = _parabolas(log_n, loss, cells, cells.max() + 1, near_minimum(W, log_n, loss, cells))["value"][0]
    truth = np.array([true_vertex(TOP, s, u, INTERIOR)[1]
                      for (u, s), _ in frame.groupby(["unique_tokens", "sparsity"])])
    assert np.abs(local - truth).max() < 0.5 * np.abs(every - truth).max()
    assert np.abs(local - truth).max() < 0.01
    fitted = model.vertices_.sort_values(["unique_tokens", "sparsity"])["loss_star"].to_numpy()
    assert fitted == pytest.approx(local)  # the law uses the local parabola
