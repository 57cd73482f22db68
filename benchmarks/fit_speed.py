"""Speed of the fitting engine.

Default: the Chinchilla approach-3 fit from Hoffmann et al.'s 4,500-start grid on Epoch AI's Chinchilla points
(240 after dropping the 5 highest losses), this project's batched L-BFGS (``Chinchilla().fit``) against the
reference Epoch used: ``scipy.optimize.minimize(method="L-BFGS-B")`` once per start, same data, same objective
(summed Huber, δ = 1e-3, of log residuals in the LSE form), with the analytic gradient. Both best parameter
vectors are scored by the same reference objective. Target: >= 50x faster, best objective <= the reference's
(relative difference <= 1e-6). Rounds interleave ours and the reference; times are medians.

``--bootstrap``: a 1,000-resample bootstrap over runs of ``IsoFLOP`` and ``Chinchilla`` on a synthetic 60-run
sweep (6 budgets x 10 sizes, 1% noise). Target: under 60 s on 2 cores.

    python benchmarks/fit_speed.py [--rounds N] [--json]
    python benchmarks/fit_speed.py --bootstrap [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from scaling.laws import HOFFMANN_GRID, HUBER_DELTA, Chinchilla, IsoFLOP, chinchilla_optimum


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


def fit_speed(rounds: int) -> dict[str, float]:
    frame = chinchilla_points()
    fun = reference_objective(frame)
    run_ours(frame)  # warm-up: imports, first allocations
    ours_s, ref_s = [], []
    for _ in range(rounds):
        seconds, theta = timed(run_ours, frame)
        ours_s.append(seconds)
        seconds, (ref_objective, _) = timed(run_reference, frame)
        ref_s.append(seconds)
    seconds, theta = timed(run_ours, frame)  # the last reference round is bracketed by ours too
    ours_s.append(seconds)
    ours, ref = statistics.median(ours_s), statistics.median(ref_s)
    return {"ours_s": ours, "reference_s": ref, "speedup": ref / ours,
            "ours_objective": fun(np.array(theta))[0], "reference_objective": ref_objective}


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
    frame = synthetic_sweep()
    out = {"runs": len(frame), "resamples": resamples}
    for law in (IsoFLOP, Chinchilla):
        seconds = [timed(law(bootstrap=resamples, seed=r).fit, frame)[0] for r in range(rounds)]
        out[f"{law.__name__.lower()}_s"] = statistics.median(seconds)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", action="store_true", help="time the 1,000-resample bootstraps instead")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians are reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    args = parser.parse_args(argv)
    if args.bootstrap:
        result = bootstrap_speed(max(args.rounds, 1))
        text = (f"bootstrap, {result['resamples']} resamples of {result['runs']} runs (median of "
                f"{args.rounds}): IsoFLOP {result['isoflop_s']:.2f} s, "
                f"Chinchilla {result['chinchilla_s']:.2f} s")
    else:
        result = fit_speed(max(args.rounds, 1))
        ours, ref = result["ours_objective"], result["reference_objective"]
        text = (f"ours {result['ours_s']:.2f} s, reference (scipy L-BFGS-B per start) "
                f"{result['reference_s']:.1f} s, speedup {result['speedup']:.0f}x (median of {args.rounds})\n"
                f"best objective: ours {ours:.12g}, reference {ref:.12g} (relative difference "
                f"{(ours - ref) / ref:+.2e})")
    print(json.dumps(result) if args.json else text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
