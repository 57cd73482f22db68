"""Speed of the fitting engine.

Default: the Chinchilla approach-3 fit from Hoffmann et al.'s 4,500-start grid on Epoch AI's Chinchilla points
(240 after dropping the 5 highest losses): this project's fitter (``Chinchilla().fit``: batched damped Newton
with analytic Hessians, dominated starts pruned) against the reference Epoch used,
``scipy.optimize.minimize(method="L-BFGS-B")`` once per start, same data, same objective (summed Huber,
δ = 1e-3, of log residuals in the LSE form). The reference gets the analytic gradient (Epoch's script let scipy
take finite differences, five more objective calls per gradient), so it is faster than Epoch's own. Both best
parameter vectors are scored by the same reference objective. Target: >= 50x faster, best objective <= the
reference's (relative difference <= 1e-6). Each round times ours ``--repeats`` times, then the reference once
(and ours again after the last round); the times reported are medians, the ratio is of the medians.

BLAS is held to one thread (before numpy loads): scipy's L-BFGS-B calls BLAS on 5-vectors, and a threaded
OpenBLAS on a busy 2-core machine makes it several times slower, which would handicap the reference.

``--bootstrap``: a 1,000-resample bootstrap over runs of ``IsoFLOP`` and ``Chinchilla`` on a synthetic 60-run
sweep (6 budgets x 10 sizes, 1% noise). Target: under 60 s on 2 cores.

    python benchmarks/fit_speed.py [--rounds N] [--repeats K] [--json]
    python benchmarks/fit_speed.py --bootstrap [--rounds N] [--json]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

from scaling.laws import HOFFMANN_GRID, Chinchilla, IsoFLOP, chinchilla_optimum  # noqa: E402
from scaling.solve import HUBER_DELTA  # noqa: E402

TARGET_SPEEDUP = 50.0
TARGET_RELATIVE = 1e-6
TARGET_BOOTSTRAP_S = 60.0


def chinchilla_loss(p: dict[str, float], n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


DATA = Path(__file__).resolve().parent.parent / "data" / "published" / "chinchilla_epoch_svg_extracted.csv"


def chinchilla_points() -> pd.DataFrame:
    raw = pd.read_csv(DATA).sort_values("loss").iloc[:-5]  # Epoch dropped the 5 highest losses
    n, flops = raw["Model Size"], raw["Training FLOP"]
    return pd.DataFrame({"params": n, "tokens": flops / (6 * n), "loss": raw["loss"]})


def reference_objective(frame: pd.DataFrame):
    """Epoch's objective for one start, θ = (a, b, e, α, β), with its analytic gradient."""
    log_n, log_d, y = (np.log(frame[c].to_numpy()) for c in ("params", "tokens", "loss"))

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b, e, alpha, beta = theta
        terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
        top = terms.max(axis=0)
        parts = np.exp(terms - top)
        total = parts.sum(axis=0)
        r = top + np.log(total) - y
        c = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
        q = c / total * parts
        grad = np.array([q[0].sum(), q[1].sum(), q[2].sum(), -q[0] @ log_n, -q[1] @ log_d])
        return float(np.sum(c * (r - 0.5 * c))), grad

    return fun


def run_reference(frame: pd.DataFrame) -> tuple[float, np.ndarray]:
    """One scipy L-BFGS-B per start of the grid; the best end point."""
    fun = reference_objective(frame)
    grid = itertools.product(*(HOFFMANN_GRID[k] for k in ("a", "b", "e", "alpha", "beta")))
    best = min((minimize(fun, np.array(x0), jac=True, method="L-BFGS-B") for x0 in grid), key=lambda r: r.fun)
    return float(best.fun), best.x


def run_ours(frame: pd.DataFrame) -> np.ndarray:
    """This project's fit; its best point as θ = (a, b, e, α, β)."""
    p = Chinchilla().fit(frame).params_
    return np.array([np.log(p["A"]), np.log(p["B"]), np.log(p["E"]), p["alpha"], p["beta"]])


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def fit_speed(rounds: int, repeats: int = 5) -> dict[str, float]:
    frame = chinchilla_points()
    fun = reference_objective(frame)
    run_ours(frame)  # warm-up: imports, first allocations
    ours_s, ref_s = [], []

    def ours() -> np.ndarray:
        for _ in range(repeats):
            seconds, theta = timed(run_ours, frame)
            ours_s.append(seconds)
        return theta

    for _ in range(rounds):
        ours()
        seconds, (ref_objective, _) = timed(run_reference, frame)
        ref_s.append(seconds)
    theta = ours()  # the last reference round is bracketed by ours too
    ours_median, ref_median = statistics.median(ours_s), statistics.median(ref_s)
    ours_objective = fun(np.array(theta))[0]
    relative = (ours_objective - ref_objective) / ref_objective
    return {"ours_s": ours_median, "reference_s": ref_median, "speedup": ref_median / ours_median,
            "ours_objective": ours_objective, "reference_objective": ref_objective,
            "relative_difference": relative, "rounds": rounds, "ours_runs": len(ours_s),
            "starts": int(np.prod([len(v) for v in HOFFMANN_GRID.values()])),
            "target_met": bool(ref_median / ours_median >= TARGET_SPEEDUP and relative <= TARGET_RELATIVE)}


def synthetic_sweep(seed: int = 0) -> pd.DataFrame:
    """60 runs: 6 budgets x 10 sizes around the compute-optimal N of a known law, 1% multiplicative noise."""
    truth = {"E": 1.8, "A": 400.0, "B": 1200.0, "alpha": 0.34, "beta": 0.28}
    rng = np.random.default_rng(seed)
    rows = [{"flops": c, "params": n, "active_params": n, "tokens": c / (6 * n)}
            for c in np.logspace(17, 22, 6)
            for n in chinchilla_optimum(truth, c)["N_opt"] * np.geomspace(1 / 5, 5, 10)]
    frame = pd.DataFrame(rows)
    frame["run_id"] = [f"run{i}" for i in range(len(frame))]
    loss = chinchilla_loss(truth, frame["params"], frame["tokens"])
    frame["loss"] = loss * np.exp(rng.normal(0, 0.01, len(frame)))
    return frame


def bootstrap_speed(rounds: int, resamples: int = 1000) -> dict[str, float]:
    """Rounds alternate the two laws; medians."""
    frame = synthetic_sweep()
    out = {"runs": len(frame), "resamples": resamples}
    seconds: dict[str, list[float]] = {law.__name__.lower(): [] for law in (IsoFLOP, Chinchilla)}
    for r in range(rounds):
        for law in (IsoFLOP, Chinchilla):
            seconds[law.__name__.lower()].append(timed(law(bootstrap=resamples, seed=r).fit, frame)[0])
    out.update({f"{name}_s": statistics.median(values) for name, values in seconds.items()})
    out["target_met"] = bool(max(out["isoflop_s"], out["chinchilla_s"]) < TARGET_BOOTSTRAP_S)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", action="store_true", help="time the 1,000-resample bootstraps instead")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of ours per round")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    args = parser.parse_args(argv)
    rounds = max(args.rounds, 1)
    if args.bootstrap:
        result = bootstrap_speed(rounds)
        text = (f"bootstrap, {result['resamples']} resamples of {result['runs']} runs (median of {rounds}): "
                f"IsoFLOP {result['isoflop_s']:.2f} s, Chinchilla {result['chinchilla_s']:.2f} s "
                f"(target < {TARGET_BOOTSTRAP_S:.0f} s: {'met' if result['target_met'] else 'NOT met'})")
    else:
        result = fit_speed(rounds, max(args.repeats, 1))
        ours, ref = result["ours_objective"], result["reference_objective"]
        text = (f"{result['starts']} starts: ours {result['ours_s']:.3f} s (median of {result['ours_runs']}), "
                f"reference (scipy L-BFGS-B per start) {result['reference_s']:.1f} s (median of {rounds}), "
                f"speedup {result['speedup']:.0f}x\n"
                f"best objective: ours {ours:.15g}, reference {ref:.15g} (relative difference "
                f"{result['relative_difference']:+.2e})\n"
                f"target (>= {TARGET_SPEEDUP:.0f}x, relative difference <= {TARGET_RELATIVE:g}): "
                f"{'met' if result['target_met'] else 'NOT met'}")
    print(json.dumps(result) if args.json else text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
