"""Fitting a large CSV: wall time and peak memory of ``scaling fit --csv`` on generated runs.

Writes ROWS runs drawn from a known Chinchilla law (budgets over five decades, sizes over four, 1% noise), then
times ``scaling fit --csv FILE --law L`` for each law as its own process and reads that process's peak resident
memory (``os.wait4``). Targets: at most 1 GB of memory for every law, and at most 10 s for isoflop (200,000 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

TRUTH = {"E": 1.8, "A": 400.0, "B": 1200.0, "alpha": 0.34, "beta": 0.28}
TARGET_RSS_GB = 1.0
TARGET_ISOFLOP_S = 10.0


def runs(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    c, n = 10 ** rng.uniform(17, 22, rows), 10 ** rng.uniform(7, 11, rows)
    d = c / (6 * n)
    loss = TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]
    return pd.DataFrame({"params": n, "tokens": d, "flops": c, "loss": loss * np.exp(rng.normal(0, 0.01, rows))})


def measured(path: Path, law: str) -> dict[str, float]:
    """One ``scaling fit`` process: seconds, peak RSS in GB, and the fitted parameters."""
    command = [str(Path(sys.executable).parent / "scaling"), "fit", "--csv", str(path), "--law", law,
               "--format", "json"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"scaling fit --law {law} failed")
    return {"seconds": seconds, "rss_gb": usage.ru_maxrss / 1e6, "params": json.loads(out)["params"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--laws", nargs="+", default=["isoflop", "chinchilla"])
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "runs.csv"
        runs(args.rows).to_csv(path, index=False)
        result = {"rows": args.rows, **{law: measured(path, law) for law in args.laws}}
    result["target_met"] = all(result[law]["rss_gb"] <= TARGET_RSS_GB for law in args.laws) and (
        "isoflop" not in args.laws or result["isoflop"]["seconds"] <= TARGET_ISOFLOP_S)
    if args.json:
        print(json.dumps(result))
        return
    for law in args.laws:
        r = result[law]
        print(f"{law}, {args.rows} rows: {r['seconds']:.1f} s, peak RSS {r['rss_gb']:.2f} GB "
              f"({r['rss_gb'] / TARGET_RSS_GB:.2f} of the {TARGET_RSS_GB:g} GB target)")
    print(f"targets (RSS <= {TARGET_RSS_GB:g} GB each, isoflop <= {TARGET_ISOFLOP_S:g} s): "
          f"{'met' if result['target_met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
