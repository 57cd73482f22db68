"""Store migrations on a DuckDB file written by the previous release.

tests/data/threads_v1/: ``store_v1.duckdb.gz`` (schema version 1, every spec with ``train.threads = 0``) and in
``run_files/`` (copied to ``runs/``) the runs' ``log.txt`` files, as the previous release's ``scaling run`` left
them (really trained; run directories relative to the store's folder): sweep ``two_threads`` with ``--workers 1``
on 2 cores (2 threads per run), sweep ``one_thread`` with ``--workers 2`` (1 thread per run). ``BASE`` is the
sweep they were planned from.
"""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from scaling.config import RunSpec, parse_sweep
from scaling.runner import dry_run
from scaling.store import SCHEMA_VERSION, connect, recorded_threads

FIXTURE = Path(__file__).resolve().parent / "data" / "threads_v1"
BASE = {"budgets": [1e10], "unique_tokens": 200_000, "context": 64, "max_epochs": 20, "min_steps": 40,
        "sparsity": {"experts": [1]}, "sizes": {"count": 2, "span": 4.0},
        "shape": {"rule": "size", "aspect_ratio": 16, "head_dim": 16},
        "train": {"lr": 3e-3, "batch_size": 16, "eval_tokens": 4096, "token_loss_tokens": 1024}}
SWEEPS = {"two_threads": 0, "one_thread": 1}  # name -> seed


def sweep(name: str, **train):
    return parse_sweep({**BASE, "name": name, "seeds": [SWEEPS[name]], "train": {**BASE["train"], **train}})


@pytest.fixture
def v1_store(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIXTURE / "run_files", tmp_path / "runs")
    db = tmp_path / "store.duckdb"
    with gzip.open(FIXTURE / "store_v1.duckdb.gz") as src, open(db, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return db


def snapshot(db: Path) -> dict[str, dict]:
    con = connect(db, read_only=True)  # a reader never migrates
    try:
        rows = con.execute("""
            SELECT r.run_id, s.sweep, r.status, r.final_eval_loss, r.spec, r.run_dir,
                   (SELECT count(*) FROM metrics m WHERE m.run_id = r.run_id) AS metrics,
                   (SELECT count(*) FROM token_loss_arrays t WHERE t.run_id = r.run_id) AS arrays
            FROM runs r JOIN sweep_runs s USING (run_id)""").df()
        version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()[0][0]
    finally:
        con.close()
    return {"version": int(version), "runs": {r["run_id"]: r for r in rows.to_dict("records")}}


def test_v1_runs_get_the_thread_count_they_trained_with(v1_store):
    before = snapshot(v1_store)
    assert before["version"] == 1 and len(before["runs"]) == 2
    assert {json.loads(r["spec"])["train"]["threads"] for r in before["runs"].values()} == {0}
    assert {r["status"] for r in before["runs"].values()} == {"ok"}
    connect(v1_store).close()  # a writer migrates
    after = snapshot(v1_store)
    assert after["version"] == SCHEMA_VERSION
    con = connect(v1_store, read_only=True)
    try:
        aliases = dict(con.execute("SELECT old_id, run_id FROM run_aliases").fetchall())
        threads = dict(con.execute("SELECT run_id, threads FROM runs").fetchall())
    finally:
        con.close()
    for old_id, old in before["runs"].items():
        (count,) = recorded_threads(Path(old["run_dir"]))
        assert count == (2 if old["sweep"] == "two_threads" else 1)
        spec = json.loads(old["spec"])
        spec["train"]["threads"] = count
        new_id = RunSpec.from_dict(spec).run_id
        assert (new_id == old_id) == (count == 1)  # one thread keeps its id
        assert aliases.get(old_id, old_id) == new_id and threads[new_id] == count
        new = after["runs"][new_id]
        assert json.loads(new["spec"])["train"]["threads"] == count
        for key in ("sweep", "status", "final_eval_loss", "run_dir", "metrics", "arrays"):
            assert new[key] == old[key], key  # results, curves and per-token losses moved with the run
    assert len(after["runs"]) == 2 and len(aliases) == 1


def test_migrated_runs_are_found_by_the_sweep_that_asks_for_their_thread_count(v1_store):
    connect(v1_store).close()
    assert dry_run(str(v1_store), sweep("one_thread"), retries=1).empty  # one thread, the default: all done
    assert dry_run(str(v1_store), sweep("two_threads", threads=2), retries=1).empty
    todo = dry_run(str(v1_store), sweep("two_threads"), retries=1)  # now asks for one thread: trained anew
    assert len(todo) == 1 and set(todo.status) == {"planned"}
