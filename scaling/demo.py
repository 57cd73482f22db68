"""``scaling demo``: the main job — compute-optimal sparsity under finite data, end to end.

Prepares the default corpus, trains ``sweeps/demo.toml`` (reusing finished runs), fits the laws, writes the HTML
report and prints the one-sentence answer with where everything is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from scaling.config import load_sweep
from scaling.data import prepare
from scaling.grid import quick as reduce
from scaling.output import err
from scaling.report import write_report
from scaling.store import db_path
from scaling.sweep import execute_sweep

DEMO_SWEEP = Path(__file__).resolve().parents[1] / "sweeps" / "demo.toml"


def run_demo(db: str | None, runs_dir: Path, out: Path | None, quick: bool = False, workers: int = 1,
             bootstrap: int = 200) -> dict:
    """Train, fit and report the demo sweep; returns the answer (also in ``out/answer.json``)."""
    started = time.monotonic()
    sweep = load_sweep(DEMO_SWEEP)
    if quick:
        sweep = reduce(sweep)
        bootstrap = min(bootstrap, 50)
    out = out or Path("reports") / sweep.name
    err(f"corpus: {prepare(sweep.corpus, sweep.tokenizer, sweep.vocab_size)}")
    execute_sweep(sweep, db, runs_dir, workers=workers)
    report = write_report(db, sweep.name, out, bootstrap=bootstrap)
    answer = json.loads((out / "answer.json").read_text())
    database = db_path(db).absolute()
    minutes = (time.monotonic() - started) / 60
    print(f"\nreport:   {report}")
    print(f"database: {database}")
    print(f"\n{answer['sentence']}\n")
    print("try:")
    print(f'  scaling sql --db {database} "SELECT sparsity, budget, min(final_eval_loss) AS best_loss '
          f"FROM final_losses WHERE sweep = '{sweep.name}' GROUP BY ALL ORDER BY ALL\"")
    print(f'  scaling sql --db {database} "SELECT law, parameter, value, ci_lo, ci_hi FROM fit_params '
          f"WHERE sweep = '{sweep.name}' ORDER BY created_at DESC, law\"")
    print(f'  scaling sql --db {database} "SELECT sparsity, epochs, generalization_gap FROM final_losses '
          f"WHERE sweep = '{sweep.name}' ORDER BY epochs DESC LIMIT 10\"")
    print(f"\n(demo took {minutes:.1f} min)")
    return answer
