"""``scaling demo``: the main job — the optimal sparsity under plenty and under scarce unique data, end to end.

Prepares the default corpus, trains ``sweeps/demo.toml`` (reusing finished runs; it sweeps two unique-token
limits), fits the laws, writes the HTML report and prints the answer (S* per regime from the isoFLOP vertices and
the verdict on their difference) with where everything is.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from scaling.config import load_sweep
from scaling.data import prepare
from scaling.grid import quick as reduce
from scaling.output import err
from scaling.report import write_report
from scaling.store import connect, db_path
from scaling.sweep import duration, execute_sweep

DEMO_SWEEP = Path(__file__).resolve().parents[1] / "sweeps" / "demo.toml"
QUICK_SPAN = 6.0  # sizes of ``--quick`` within 6x: the smoke test stays near 2 minutes on 2 cores


def run_demo(db: str | None, runs_dir: Path, out: Path | None, quick: bool = False, workers: int = 1,
             bootstrap: int = 200) -> dict:
    """Train, fit and report the demo sweep; returns the answer (also in ``out/answer.json``)."""
    started = time.monotonic()
    sweep = load_sweep(DEMO_SWEEP)
    if quick:  # the smallest sizes of the full span train slowest (most tokens, least throughput): a narrower one
        sweep = reduce(sweep, span=QUICK_SPAN)
        bootstrap = min(bootstrap, 50)
    out = out or Path("reports") / sweep.name
    err(f"corpus: {prepare(sweep.corpus, sweep.tokenizer, sweep.vocab_size)}")
    execute_sweep(sweep, db, runs_dir, executor="local", options={"workers": workers})
    stamp = fingerprint(db, sweep.name, bootstrap)
    answer_file = out / "answer.json"
    previous = json.loads(answer_file.read_text()) if answer_file.exists() else {}
    if previous.get("fingerprint") == stamp and (out / "index.html").exists():
        report, answer = out / "index.html", previous  # nothing new since the last report
    else:
        report = write_report(db, sweep.name, out, bootstrap=bootstrap)
        answer = {**json.loads(answer_file.read_text()), "fingerprint": stamp}
        answer_file.write_text(json.dumps(answer, indent=2))
    database = db_path(db).absolute()
    took = duration(time.monotonic() - started)
    print(f"\nreport:   {report}")
    print(f"database: {database}")
    print(f"\n{answer['sentence']}\n")
    print("try:")
    print(f'  scaling sql --db {database} "SELECT sparsity, budget, min(final_eval_loss) AS best_loss '
          f"FROM final_losses WHERE sweep = '{sweep.name}' GROUP BY ALL ORDER BY ALL\"")
    print(f'  scaling sql --db {database} "SELECT parameter, value, ci_lo, ci_hi FROM fit_params '
          f"WHERE sweep = '{sweep.name}' AND law = 'sparsity-vertex' AND parameter LIKE 'S_star%' "
          f'ORDER BY created_at DESC, parameter"')
    print(f'  scaling sql --db {database} "SELECT sparsity, epochs, generalization_gap FROM final_losses '
          f"WHERE sweep = '{sweep.name}' ORDER BY epochs DESC LIMIT 10\"")
    print(f"\n(demo took {took})")
    return answer


def code_version() -> str:
    """A hash of the package's source: the fits and figures are its output."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def fingerprint(db: str | None, sweep: str, bootstrap: int) -> str:
    """What the report depends on: the sweep's finished runs (ids and ingest times), the bootstrap size and the
    code that fits and draws them."""
    con = connect(db, read_only=True)
    try:
        rows = con.execute("""SELECT r.run_id, r.status, r.ingested_at FROM runs r JOIN sweep_runs s USING (run_id)
                              WHERE s.sweep = ? ORDER BY r.run_id""", [sweep]).fetchall()
    finally:
        con.close()
    return hashlib.sha256(json.dumps([rows, bootstrap, code_version()], default=str).encode()).hexdigest()[:16]
