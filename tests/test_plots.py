"""Every figure function on synthetic frames with the store views' columns: a ggplot that saves, or None."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from synthetic import loss_law

from scaling import plots

BUDGETS = [1e11, 3e11, 1e12]
VARIANTS = [(1, 1), (2, 1), (4, 1), (8, 1)]
U = 500_000


def make_points(variants: list[tuple[int, int]] = VARIANTS, seed: int = 0) -> pd.DataFrame:
    """``isoflop_points``-like rows (+ n_experts, top_k, final train loss): 5 sizes per budget and variant."""
    rng = np.random.default_rng(seed)
    rows = []
    for budget in BUDGETS:
        for experts, k in variants:
            for active in np.geomspace(0.3, 3, 5) * np.sqrt(budget / 120):
                total = active * (1 + 0.6 * (experts - k) / k)
                tokens = budget / (6 * active)
                rows.append({"sweep": "t", "budget": budget, "run_id": f"r{len(rows)}", "params": total,
                             "active_params": active, "tokens": tokens, "unique_tokens": U,
                             "sparsity": (experts - k) / experts, "n_experts": experts, "top_k": k,
                             "flops": budget, "epochs": tokens / U, "seed": 0})
    frame = pd.DataFrame(rows)
    law = loss_law(frame.active_params, frame.params, frame.tokens, U, frame.sparsity)
    frame["loss"] = law + rng.normal(0, 0.01, len(frame))
    frame["final_eval_loss"] = frame["loss"]
    frame["final_train_loss"] = frame["loss"] - 0.02 * frame["epochs"] * (1 + frame["sparsity"])
    return frame


def make_vertices(points: pd.DataFrame) -> pd.DataFrame:
    """``IsoFLOP.vertices_``-like rows with a sparsity column (the true optimum ±30%)."""
    _, own = plots.parabolas(points, "active_params")
    return pd.DataFrame({"budget": own.budget, "sparsity": own.sparsity, "n_opt": own.opt, "n_lo": own.opt / 1.3,
                         "n_hi": own.opt * 1.3, "d_opt": own.budget / (6 * own.opt), "loss_opt": own.loss_opt,
                         "in_range": own.in_range, "n_points": 5})


def make_curves(points: pd.DataFrame) -> pd.DataFrame:
    """``training_curves``-like rows: eval loss every 10th step, wall seconds from a throughput."""
    rows = []
    for run in points.to_dict("records"):
        for frac in np.geomspace(0.01, 1, 12):
            tokens = run["tokens"] * frac
            rows.append({**{k: run[k] for k in ("sweep", "budget", "run_id", "sparsity", "n_experts", "top_k",
                                                 "active_params", "params", "seed")},
                         "step": int(frac * 1000), "tokens": tokens, "epochs": tokens / U,
                         "eval_loss": run["loss"] + 3 * (1 - frac**0.5), "train_loss": run["loss"],
                         "wall_s": tokens / 2e4 * (1 + run["sparsity"])})
    return pd.DataFrame(rows)


def make_router(points: pd.DataFrame, dropped: float = 0.0) -> pd.DataFrame:
    """``router_stats`` rows joined with the run columns, for the MoE runs."""
    rng = np.random.default_rng(1)
    rows = []
    for run in points[points.n_experts > 1].to_dict("records"):
        for step in (16, 32, 64, 128):
            for layer in range(2):
                load = rng.dirichlet(np.full(run["n_experts"], 2 + step / 8))
                for expert in range(run["n_experts"]):
                    rows.append({"run_id": run["run_id"], "step": step, "tokens": step * 4096, "layer": layer,
                                 "expert": expert, "load": load[expert], "entropy": 1.0,
                                 "dropped_frac": dropped / step, **{k: run[k] for k in (
                                     "budget", "sparsity", "n_experts", "top_k", "active_params")}})
    return pd.DataFrame(rows)


def make_similarity() -> pd.DataFrame:
    tokens = np.geomspace(1e4, 1e6, 8)
    return pd.concat([pd.DataFrame({"tokens": tokens, "r2": r2, "r2_lo": r2 - 0.03, "r2_hi": r2 + 0.03,
                                    "kind": kind})
                      for kind, r2 in (("MoE vs dense", np.linspace(0.5, 0.8, 8)),
                                       ("MoE seed vs seed", np.linspace(0.4, 0.7, 8)),
                                       ("dense small vs large", np.linspace(0.85, 0.9, 8)))], ignore_index=True)


def envelope_fit() -> pd.DataFrame:
    """Envelope parameters as the law names them (shared L_inf, alpha; A and multiplier per sparsity)."""
    rows = [("L_inf", 1.0), ("alpha", 0.15)]
    for s, m in ((0.0, 1.0), (0.5, 1.4), (0.75, 1.9), (0.875, 2.3)):
        rows.append((f"A_S{s:g}", 135.0 / m**0.15))
        if s:
            rows.append((f"multiplier_S{s:g}", m))
    return pd.DataFrame([{"name": n, "value": v, "ci_lo": v * 0.8, "ci_hi": v * 1.2} for n, v in rows])


def figures(points: pd.DataFrame) -> dict[str, object]:
    """Every figure on the synthetic frames (the set the report draws)."""
    vertices = make_vertices(points)
    best = plots.best_runs(points)
    prediction = best[["budget", "sparsity"]].assign(loss=best.loss + 0.005)
    optimum = pd.DataFrame({"budget": BUDGETS, "S_star": [0.6, 0.7, 0.8], "S_lo": [0.4, 0.55, 0.7],
                            "S_hi": [0.8, 0.85, 0.95], "loss": best.groupby("budget").loss.min().to_numpy() - 0.01})
    epochs = np.geomspace(0.3, 30, 30)
    size = points.active_params.median()
    repetition = pd.DataFrame({"sparsity": 0.0, "active_params": size, "epochs": epochs,
                               "loss": loss_law(size, size, epochs * U, U, 0.0)})
    exponents = pd.DataFrame([{"sparsity": 0.0, "name": "a", "value": 0.5, "ci_lo": 0.4, "ci_hi": 0.6}])
    return {
        "isoflop_n": plots.isoflop_plot(points, vertices),
        "isoflop_d": plots.isoflop_plot(points, vertices, x="tokens"),
        "isoflop_own": plots.isoflop_plot(points),
        "frontier": plots.frontier_plot(vertices, exponents),
        "sparsity": plots.sparsity_plot(points, prediction, optimum),
        "envelope": plots.envelope_plot(points, envelope_fit()),
        "epochs": plots.epochs_plot(points, repetition, r_d_star=4.0),
        "gap": plots.gap_plot(points),
        "curves": plots.curves_plot(make_curves(points)),
        "router_load": plots.router_load_plot(make_router(points)),
        "router_health": plots.router_health_plot(make_router(points, dropped=0.2)),
        "similarity": plots.similarity_plot(make_similarity()),
    }


@pytest.fixture(scope="module")
def drawn() -> dict[str, object]:
    return figures(make_points())


@pytest.mark.parametrize("name", ["isoflop_n", "isoflop_d", "isoflop_own", "frontier", "sparsity", "envelope",
                                  "epochs", "gap", "curves", "router_load", "router_health", "similarity"])
def test_figure_saves(drawn, name, tmp_path):
    png, svg = plots.save(drawn[name], tmp_path / name, dpi=40)
    assert png.read_bytes()[:4] == b"\x89PNG" and svg.read_text().lstrip().startswith("<?xml")


def test_missing_inputs_give_none_or_data_only():
    empty = pd.DataFrame(columns=["budget", "sparsity", "active_params", "tokens", "loss"])
    assert plots.isoflop_plot(empty) is None and plots.isoflop_plot(None) is None
    assert plots.frontier_plot(None) is None and plots.sparsity_plot(empty) is None
    assert plots.envelope_plot(None) is None and plots.epochs_plot(empty) is None and plots.gap_plot(None) is None
    assert plots.curves_plot(None) is None and plots.similarity_plot(pd.DataFrame()) is None
    dense = make_points(variants=[(1, 1)])
    assert plots.router_load_plot(make_router(dense)) is None and plots.router_health_plot(None) is None
    # failed fits: the data alone still plots; two sizes per budget give no parabola but still points
    two_sizes = dense[dense.groupby("budget").cumcount() < 2]
    for plot in (plots.isoflop_plot(two_sizes), plots.sparsity_plot(dense), plots.envelope_plot(dense),
                 plots.epochs_plot(dense), plots.frontier_plot(make_vertices(dense).iloc[:1])):
        assert plot is not None
        plt.close(plot.draw())


@pytest.mark.parametrize(("value", "text"), [(1e11, "1e11"), (3e11, "3e11"), (62_000, "6.2e4"), (0.5, "5e-1")])
def test_labels(value, text):
    assert plots.sci(value) == text
    assert plots.log_labels([1e4, 3e4, 1e5]) == ["$10^{4}$", "$3{\\times}10^{4}$", "$10^{5}$"]
    assert plots.log_labels([0.5, 1, 10]) == ["0.5", "1", "10"]
    assert plots.variant_label(0.875, 8, 1) == "S = 0.875 (E=8, k=1)" and plots.variant_label(0.0) == "dense"


def test_epochs_marks_half_value_repeats_on_the_dense_facet(drawn):
    """1 + R_D*·ln 2 epochs: where Muennighoff et al.'s repeated token is worth half a new one (dense runs only)."""
    plot = drawn["epochs"]
    marks = [layer.geom.data for layer in plot.layers if type(layer.geom).__name__ == "geom_vline"
             and isinstance(layer.geom.data, pd.DataFrame) and "x" in layer.geom.data]
    assert len(marks) == 1 and marks[0]["x"].iloc[0] == pytest.approx(1 + 4.0 * np.log(2))
    assert list(marks[0]["variant"]) == ["dense"]
    assert plots.epochs_plot(make_points(), None, r_d_star=float("nan")) is not None


def test_router_load_shows_isoflop_points_not_trunks():
    """A branching sweep's trunks (no budget) are in router_stats too; the figure picks a point per sparsity."""
    points = make_points()
    router = make_router(points)
    trunks = router[router.budget == router.budget.max()].assign(run_id=lambda f: "trunk-" + f.run_id,
                                                                  budget=np.nan)
    plot = plots.router_load_plot(pd.concat([router, trunks]))
    assert not plot.data.run_id.str.startswith("trunk-").any()
    plt.close(plot.draw())
