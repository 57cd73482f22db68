"""``scaling ingest``: external runs into the store, the schema migration, idempotence, refusals."""

import gzip
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from scaling.cli import main
from scaling.fitting import fit_frame, fit_sweep
from scaling.ingest import IngestError, ingest_file
from scaling.store import SCHEMA_VERSION, connect, ingest_all

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "data" / "published"
CHINCHILLA = PUBLISHED / "chinchilla_epoch_svg_extracted.csv"
CHINCHILLA_COLUMNS = {"params": "Model Size", "flops": "Training FLOP"}
DATABLATIONS = PUBLISHED / "datablations_c4_val_losses_fit182.csv"
TABLES = ("sweeps", "runs", "sweep_runs", "metrics", "fits", "fit_values")


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``scaling ARGS`` in-process as the console script does: exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["scaling", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def dump(db: Path) -> dict[str, list]:
    """Every row of every table, to compare a store before and after."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: sorted(map(str, con.execute(f"SELECT * FROM {t}").fetchall())) for t in TABLES}
    finally:
        con.close()


def runs_file(tmp_path: Path, n: int = 12, name: str = "runs.csv") -> Path:
    rng = np.random.default_rng(0)
    params = np.repeat([1e6, 3e6, 1e7], n // 3)
    tokens = np.tile(np.geomspace(1e8, 1e9, n // 3), 3)
    frame = pd.DataFrame({"name": [f"r{i}" for i in range(n)], "params": params, "tokens": tokens,
                          "val_loss": 2 + 50 / params**0.3 + 300 / tokens**0.3 + rng.normal(0, 0.01, n)})
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def curves_file(tmp_path: Path, runs: Path) -> Path:
    frame = pd.read_csv(runs)
    rows = [{"run": r.name, "step": s, "loss": r.val_loss + 1 / s, "lr": 1e-3}
            for r in frame.itertuples() for s in (10, 20, 40, 80)]
    path = tmp_path / "curves.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_migration_of_a_store_written_by_the_previous_release(tmp_path):
    """tests/data/store_v1.duckdb.gz: a store written by schema version 1 (two ingested runs and a fit)."""
    db = tmp_path / "v1.duckdb"
    with gzip.open(ROOT / "tests" / "data" / "store_v1.duckdb.gz") as src, open(db, "wb") as dst:
        shutil.copyfileobj(src, dst)
    before = dump(db)
    con = connect(db, read_only=True)  # a reader opens the old file as it is
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [("1",)]
    con.close()
    con = connect(db)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [(str(SCHEMA_VERSION),)]
    assert {s for (s,) in con.execute("SELECT DISTINCT source FROM runs").fetchall()} == {"trained"}
    assert con.execute("SELECT count(*) FROM final_losses").fetchall()[0][0] == 2
    con.close()
    after = dump(db)
    assert after["runs"] != before["runs"] and len(after["runs"]) == len(before["runs"])
    for table in ("sweeps", "sweep_runs", "metrics", "fits", "fit_values"):
        assert after[table] == before[table]
    ingest_file(db, runs_file(tmp_path), "ext", columns={"loss": "val_loss"})
    con = connect(db)  # already migrated: opening again changes nothing
    assert con.execute("SELECT source = 'trained', count(*) FROM runs GROUP BY ALL ORDER BY ALL").fetchall() == [
        (False, 12), (True, len(before["runs"]))]
    con.close()


def test_published_files_fit_as_their_csv(tmp_path):
    """The README's ingest commands, then `scaling fit` on the sweep equals `scaling fit --csv` on the file (the
    store keeps params and tokens as integers: equal to 1e-6)."""
    db = tmp_path / "p.duckdb"
    for sweep, path, columns, key, law in (
            ("chinchilla", CHINCHILLA, CHINCHILLA_COLUMNS, None, "chinchilla"),
            ("datablations", DATABLATIONS, {"loss": "val_loss"}, "run_name", "data-constrained")):
        done = ingest_file(db, path, sweep, columns=columns, key=key)
        assert done.added == len(pd.read_csv(path))
        ours, theirs = fit_sweep(db, sweep, law), fit_frame(path, law, columns=columns)
        assert ours["n_points"] == theirs["n_points"]
        for name, value in theirs["params"].items():
            assert ours["params"][name] == pytest.approx(value, rel=1e-6), name
    con = connect(db, read_only=True)
    sources = con.execute("SELECT DISTINCT source FROM runs ORDER BY 1").fetchall()
    assert [Path(s).name for (s,) in sources] == [CHINCHILLA.name, DATABLATIONS.name]
    assert con.execute("SELECT count(*) FROM fits").fetchall()[0][0] == 2
    con.close()


def test_every_published_file_ingests_with_its_readme_command(tmp_path, monkeypatch, capsys):
    commands = [line.split("scaling ", 1)[1] for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("scaling ingest data/published/")]
    files = {p.name for p in PUBLISHED.glob("*.csv")}
    assert {c.split()[1].split("/")[-1] for c in commands} == files
    monkeypatch.chdir(ROOT)
    for command in commands:
        code, out, err = cli(monkeypatch, capsys, *shlex.split(command), "--db", str(tmp_path / "r.duckdb"),
                             "--format", "json")
        assert code == 0, err
        assert json.loads(out)[0]["added"] > 0


def test_same_file_twice_changes_nothing_and_a_changed_file_updates_its_rows(tmp_path):
    db = tmp_path / "r.duckdb"
    path = runs_file(tmp_path)
    columns = {"loss": "val_loss"}
    curves = curves_file(tmp_path, path)
    first = ingest_file(db, path, "ext", columns=columns, key="name", curves=curves)
    assert (first.added, first.curve_points) == (12, 48)
    stored = dump(db)
    again = ingest_file(db, path, "ext", columns=columns, key="name", curves=curves)
    assert (again.added, again.updated, again.unchanged, again.removed) == (0, 0, 12, 0)
    assert dump(db) == stored
    frame = pd.read_csv(path)
    frame.loc[0, "val_loss"] += 0.1  # changed
    frame = pd.concat([frame.iloc[:-1], frame.iloc[[1]].assign(name="new")])  # one removed, one added
    frame.to_csv(path, index=False)
    pd.read_csv(curves).query("run != 'r11'").to_csv(curves, index=False)
    changed = ingest_file(db, path, "ext", columns=columns, key="name", curves=curves)
    assert (changed.added, changed.updated, changed.unchanged, changed.removed) == (1, 1, 10, 1)
    con = connect(db, read_only=True)
    assert con.execute("SELECT final_eval_loss FROM runs WHERE run_id = 'ext/r0'").fetchall()[0][0] == \
        pytest.approx(frame["val_loss"].iloc[0])
    assert con.execute("SELECT count(*) FROM runs WHERE run_id = 'ext/r11'").fetchall()[0][0] == 0
    assert con.execute("SELECT count(*) FROM training_curves WHERE sweep = 'ext'").fetchall()[0][0] == 44
    con.close()
    con = connect(db)
    assert ingest_all(con) == {}  # external runs have no run files to look for
    con.close()
    # without --key the run is a hash of its config columns: a changed loss is an update, not a new run
    hashed = ingest_file(db, path, "hashed", columns=columns)
    frame.loc[3, "val_loss"] += 0.1
    frame.to_csv(path, index=False)
    again = ingest_file(db, path, "hashed", columns=columns)
    assert (hashed.added, again.updated, again.added, again.removed) == (12, 1, 0, 0)


def test_curves_fill_training_curves_with_tokens_from_steps(tmp_path):
    db = tmp_path / "r.duckdb"
    frame = pd.read_csv(runs_file(tmp_path))
    path = tmp_path / "runs.parquet"
    duckdb.execute(f"COPY (SELECT * FROM frame) TO '{path}' (FORMAT parquet)")
    curves = curves_file(tmp_path, runs_file(tmp_path))
    pd.read_csv(curves).to_json(tmp_path / "curves.jsonl", orient="records", lines=True)
    done = ingest_file(db, path, "pq", columns={"loss": "val_loss"}, key="name",
                       curves=tmp_path / "curves.jsonl")
    assert done.curve_points == 48 and any("tokens = D·step/last step" in n for n in done.notes)
    con = connect(db, read_only=True)
    rows = con.execute("SELECT run_id, step, tokens, eval_loss, lr FROM training_curves WHERE run_id = 'pq/r0' "
                       "ORDER BY step").fetchall()
    con.close()
    assert [r[1] for r in rows] == [10, 20, 40, 80]
    assert rows[-1][2] == pytest.approx(frame["tokens"].iloc[0])
    assert rows[0][2] == pytest.approx(frame["tokens"].iloc[0] / 8)
    assert rows[0][4] == pytest.approx(1e-3)
    frame.to_json(tmp_path / "runs.json", orient="records")  # one JSON array, not lines
    assert ingest_file(db, tmp_path / "runs.json", "js", columns={"loss": "val_loss"}).added == 12


@pytest.mark.parametrize("edit, needle", [
    (lambda f: f.drop(columns="params"), "missing required column(s) params"),
    (lambda f: f.drop(columns="tokens"), "missing required column(s) tokens or flops"),
    (lambda f: f.assign(val_loss=f["val_loss"].astype(object).where(f.index != 4, "2.3x")),
     "column 'loss' (yours: 'val_loss') has a non-numeric value '2.3x' in row 5"),
    (lambda f: f.assign(name=f["name"].where(f.index != 7, "r2")), "duplicate run key 'r2' in rows 3 and 8"),
    (lambda f: f.assign(params=-f["params"]), "column 'params' must be positive"),
])
def test_bad_runs_files_are_one_line_and_change_nothing(tmp_path, monkeypatch, capsys, edit, needle):
    db = tmp_path / "r.duckdb"
    good = runs_file(tmp_path)
    args = ["--sweep", "ext", "--column", "loss=val_loss",
            "--key", "name", "--db", str(db)]
    assert cli(monkeypatch, capsys, "ingest", str(good), *args)[0] == 0
    before = dump(db)
    bad = tmp_path / "bad.csv"
    edit(pd.read_csv(good)).to_csv(bad, index=False)
    code, out, err = cli(monkeypatch, capsys, "ingest", str(bad), *args)
    assert code == 1 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert dump(db) == before


def test_bad_curves_and_duplicate_rows_are_refused(tmp_path):
    db = tmp_path / "r.duckdb"
    path = runs_file(tmp_path)
    columns = {"loss": "val_loss"}
    curves = curves_file(tmp_path, path)
    frame = pd.read_csv(curves)
    pd.concat([frame, frame.iloc[[0]].assign(run="ghost")]).to_csv(tmp_path / "ghost.csv", index=False)
    with pytest.raises(IngestError, match="curve of run 'ghost', which is not in the runs file"):
        ingest_file(db, path, "ext", columns=columns, key="name", curves=tmp_path / "ghost.csv")
    pd.concat([frame, frame.iloc[[0]]]).to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(IngestError, match="run 'r0' has step 10 more than once"):
        ingest_file(db, path, "ext", columns=columns, key="name", curves=tmp_path / "twice.csv")
    with pytest.raises(IngestError, match="--curves needs --key"):
        ingest_file(db, path, "ext", columns=columns, curves=curves)
    runs = pd.read_csv(path)
    pd.concat([runs, runs.iloc[[2]]]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(IngestError, match="duplicate run key .* in rows 3 and 13.*--key"):
        ingest_file(db, tmp_path / "dup.csv", "ext", columns=columns)
    assert not db.exists()  # refused before the store was opened


def test_a_failure_while_writing_rolls_everything_back(tmp_path, monkeypatch):
    import scaling.ingest as ingest

    db = tmp_path / "r.duckdb"
    path = runs_file(tmp_path)
    columns = {"loss": "val_loss"}
    ingest_file(db, path, "ext", columns=columns, key="name")
    before = dump(db)
    frame = pd.read_csv(path)
    frame["val_loss"] += 0.5
    frame.to_csv(path, index=False)

    def broken(con, curves):
        raise duckdb.IOException("disk full")

    monkeypatch.setattr(ingest, "insert_curves", broken)
    with pytest.raises(duckdb.IOException):
        ingest_file(db, path, "ext", columns=columns, key="name", curves=curves_file(tmp_path, path))
    assert dump(db) == before


def test_a_trained_sweep_is_not_overwritten(tmp_path):
    from scaling.config import parse_sweep
    from scaling.grid import plan
    from scaling.store import register_plan

    db = tmp_path / "r.duckdb"
    sweep = parse_sweep({"name": "st", "budgets": [1e10], "unique_tokens": 100_000, "context": 32, "min_steps": 10,
                         "sparsity": {"experts": [1]}, "sizes": {"count": 2}, "train": {"batch_size": 8}})
    con = connect(db)
    register_plan(con, sweep, plan(sweep).runs, tmp_path / "runs")
    con.close()
    with pytest.raises(IngestError, match="planned from a sweep file"):
        ingest_file(db, runs_file(tmp_path), "st", columns={"loss": "val_loss"})


@pytest.mark.slow
def test_report_and_sql_on_an_ingested_sweep(tmp_path, monkeypatch, capsys):
    """An external sweep (5 budgets of a known law, with curves) through `scaling report` and `scaling sql`: the
    report draws what the runs support, says what they lack, and shows the extrapolation check."""
    from scaling.report import write_report

    rng = np.random.default_rng(3)
    c = np.repeat(np.geomspace(1e17, 1e19, 5), 5)
    n = np.tile(np.geomspace(0.3, 3, 5), 5) * np.sqrt(c / 120)
    d = c / (6 * n)
    loss = (1.8 + 400 / n**0.34 + 1200 / d**0.3) * np.exp(rng.normal(0, 0.01, len(n)))
    runs = pd.DataFrame({"name": [f"run{i}" for i in range(len(n))], "N": n, "D": d, "final": loss})
    runs.to_csv(tmp_path / "runs.csv", index=False)
    curves = pd.DataFrame([{"run": r.name, "tokens": r.D * f, "loss": r.final + (1 - f), "wall_s": r.D * f / 1e9}
                           for r in runs.itertuples() for f in (0.25, 0.5, 1.0)])
    curves.to_csv(tmp_path / "curves.csv", index=False)
    db = tmp_path / "r.duckdb"
    code, _, err = cli(monkeypatch, capsys, "ingest", str(tmp_path / "runs.csv"), "--sweep", "ext", "--key", "name",
                       "--column", "params=N", "--column", "tokens=D", "--column", "loss=final",
                       "--curves", str(tmp_path / "curves.csv"), "--db", str(db))
    assert code == 0 and "flops derived as C = 6·N_active·D" in err
    index = write_report(str(db), "ext", tmp_path / "report", bootstrap=10)
    page = index.read_text()
    assert "External sweep ingested from" in page and "no router statistics or per-token losses" in page
    assert "Not drawn: no MoE runs with router statistics" in page
    assert (tmp_path / "report" / "figures" / "curves.png").exists()
    assert (tmp_path / "report" / "figures" / "holdout_chinchilla.png").exists()
    assert re.search(r"fitted: <code>L = [0-9.]+ \+ [0-9.e+]+/N\^[0-9.]+ \+ [0-9.e+]+/D\^[0-9.]+</code>", page)
    code, out, _ = cli(monkeypatch, capsys, "sql", "SELECT count(*) AS n, min(source) AS source FROM runs "
                       "WHERE run_id LIKE 'ext/%'", "--db", str(db), "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 25, "source": str((tmp_path / "runs.csv").resolve())}]
