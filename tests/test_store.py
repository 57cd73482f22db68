"""The DuckDB store: planning, idempotent ingest, views, schema version."""

import json

import duckdb
import numpy as np
import pytest

from scaling.config import parse_sweep
from scaling.grid import plan
from scaling.store import SCHEMA_VERSION, StoreError, connect, ingest_all, ingest_run, register_plan, save_fit


def sweep():
    return parse_sweep({"name": "st", "budgets": [1e10], "unique_tokens": 100_000, "context": 32, "min_steps": 10,
                        "sparsity": {"experts": [1, 4]}, "sizes": {"count": 2}, "train": {"batch_size": 8}})


def fake_result(run_dir, run_id, loss=2.0):
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = [{"step": s, "tokens": 256 * s, "train_loss": loss + 1 / s, "ce_loss": loss + 1 / s, "aux_loss": 0.01,
                "z_loss": 0.001, "eval_loss": loss + 1 / s if s % 20 == 0 else None, "lr": 1e-3, "wall_s": s * 0.1}
               for s in range(10, 101, 10)]
    router = [{"step": 100, "tokens": 25600, "layer": 0, "expert": e, "load": 0.25, "entropy": 1.2,
               "dropped_frac": 0.0} for e in range(4)]
    (run_dir / "result.json").write_text(json.dumps({
        "run_id": run_id, "status": "ok", "error": None, "diverged_step": None, "steps": 100, "tokens_seen": 25600,
        "epochs_done": 0.256, "final_train_loss": loss, "final_eval_loss": loss + 0.1, "wall_s": 10.0,
        "train_s": 9.0, "tokens_per_s": 2560.0, "flops_per_s": 1e9, "started_at": "2026-01-01T00:00:00",
        "finished_at": "2026-01-01T00:00:10", "metrics": metrics, "router": router}))
    np.savez(run_dir / "token_losses.npz", steps=np.array([16, 32, 100]), tokens=np.array([16, 32, 100]) * 256,
             eval_loss=np.array([3.0, 2.5, 2.1]), losses=np.random.default_rng(0).random((3, 64), np.float32))


def test_ingest_is_idempotent(tmp_path):
    db = tmp_path / "r.duckdb"
    con = connect(db)
    s = sweep()
    runs = plan(s).runs
    register_plan(con, s, runs, tmp_path / "runs")
    run_id = runs.run_id[0]
    fake_result(tmp_path / "runs" / run_id, run_id)
    counts = lambda: [con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]  # noqa: E731
                      for t in ("runs", "metrics", "router_stats", "token_loss_arrays", "token_losses")]
    assert ingest_run(con, tmp_path / "runs" / run_id) == "ok"
    first = counts()
    assert first == [len(runs), 10, 4, 3, 3 * 64]
    assert ingest_run(con, tmp_path / "runs" / run_id) == "ok"
    register_plan(con, s, runs, tmp_path / "runs")  # replanning keeps results
    assert counts() == first
    assert ingest_all(con, "st") == {}  # nothing newer than the stored copy
    row = con.execute("SELECT final_eval_loss, generalization_gap FROM final_losses WHERE run_id = ?",
                      [run_id]).fetchall()[0]
    assert row == (pytest.approx(2.1), pytest.approx(0.1))
    assert con.execute("SELECT count(*) FROM isoflop_points").fetchall()[0][0] == 1
    assert ingest_run(con, tmp_path / "runs" / "missing") is None


def test_fits_and_views(tmp_path):
    con = connect(tmp_path / "r.duckdb")
    fit_id = save_fit(con, "st", {"law": "chinchilla", "params": {"E": 1.8, "alpha": 0.34},
                                   "ci": {"E": [1.7, 1.9]}, "optimum": {"N_opt": 1e9}, "n_points": 10,
                                   "objective": 0.01}, "SELECT 1")
    rows = con.execute("SELECT parameter, value, ci_lo, ci_hi, selection FROM fit_params WHERE fit_id = ? "
                       "ORDER BY 1", [fit_id]).fetchall()
    assert rows[0] == ("E", 1.8, 1.7, 1.9, "SELECT 1") and len(rows) == 3


def test_read_only_and_version(tmp_path):
    db = tmp_path / "r.duckdb"
    with pytest.raises(StoreError, match="no results database"):
        connect(db, read_only=True)
    connect(db).close()
    con = connect(db, read_only=True)
    with pytest.raises(duckdb.Error):
        con.execute("CREATE TABLE x (a INT)")
    con.close()
    con = duckdb.connect(str(db))
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    con.close()
    with pytest.raises(StoreError, match="newer than this scaling"):
        connect(db)
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).execute("CREATE TABLE t (a INT)").close()
    with pytest.raises(StoreError, match="not a scaling results database"):
        connect(other, read_only=True)
    with pytest.raises(StoreError, match="not a scaling results database"):
        connect(other)  # a writer does not add its tables to somebody else's file
    con = duckdb.connect(str(other))
    assert [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()] == ["t"]
    con.close()


DAMAGE = {
    "garbage": lambda run_id, d: (d / "result.json").write_text("garbage{{{"),
    "not a run": lambda run_id, d: (d / "result.json").write_text('{"foo": 1}'),
    "ok without losses": lambda run_id, d: (d / "result.json").write_text(json.dumps({"run_id": run_id,
                                                                                       "status": "ok"})),
    "another run's": lambda run_id, d: (d / "result.json").write_text(
        (d / "result.json").read_text().replace(run_id, "0123456789ab")),
    "metrics of the wrong type": lambda run_id, d: (d / "result.json").write_text(
        (d / "result.json").read_text().replace('"step": 10,', '"step": "ten",')),
    "binary": lambda run_id, d: (d / "result.json").write_bytes(bytes(range(256))),
    "truncated arrays": lambda run_id, d: (d / "token_losses.npz").write_bytes(
        (d / "token_losses.npz").read_bytes()[:100]),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_run_file_fails_its_run_in_one_line_and_is_set_aside(tmp_path, damage):
    """Whatever is in a run's files, ingest never raises, never stores an ok row without final losses and
    metrics, names the damaged file, and renames it aside so that the run is trained again."""
    con = connect(tmp_path / "r.duckdb")
    s = sweep()
    runs = plan(s).runs
    register_plan(con, s, runs, tmp_path / "runs")
    good, bad = runs.run_id[0], runs.run_id[1]
    for run_id in (good, bad):
        fake_result(tmp_path / "runs" / run_id, run_id)
    run_dir = tmp_path / "runs" / bad
    DAMAGE[damage](bad, run_dir)
    damaged_file = "token_losses.npz" if damage == "truncated arrays" else "result.json"
    con.execute("UPDATE runs SET attempts = 1")
    assert ingest_all(con, "st") == {"ok": 1, "failed": 1}
    status, error, attempts, loss = con.execute(
        "SELECT status, error, attempts, final_eval_loss FROM runs WHERE run_id = ?", [bad]).fetchall()[0]
    assert status == "failed" and "\n" not in error and attempts == 0 and loss is None
    assert error.startswith(f"damaged run file {run_dir / damaged_file}: ")
    assert not (run_dir / "result.json").exists()  # the run counts as unfinished: it is trained again
    aside = sorted(p.name for p in run_dir.iterdir() if ".damaged-" in p.name)
    assert aside and all(name in error for name in aside) and any(n.startswith(damaged_file) for n in aside)
    assert con.execute("SELECT count(*) FROM metrics WHERE run_id = ?", [bad]).fetchall()[0][0] == 0
    assert con.execute("SELECT count(*) FROM runs WHERE status = 'ok' AND (final_eval_loss IS NULL OR "
                       "final_train_loss IS NULL OR run_id NOT IN (SELECT run_id FROM metrics))").fetchall() == [(0,)]
    assert con.execute("SELECT status FROM runs WHERE run_id = ?", [good]).fetchall() == [("ok",)]
    assert ingest_all(con, "st") == {}  # nothing left to ingest; ingesting again changes nothing
    fake_result(run_dir, bad)  # the retrained run's files
    assert ingest_run(con, run_dir) == "ok"
