"""Trunks and cooldown branches: the schedule, the plan and its FLOPs accounting, the store migration, the
comparison, and real training: a branch ends exactly where a dedicated wsd run of the same D ends."""

import functools
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_CACHE
from hypothesis import given
from hypothesis import strategies as st

from scaling.branches import (
    blocked_on,
    branch_checkpoint,
    branch_plan,
    compare,
    dedicated_twin,
    lattice_sizes,
    spent_steps,
)
from scaling.config import (
    ConfigError,
    ModelConfig,
    RunSpec,
    Schedule,
    SweepConfig,
    TrainConfig,
    Variant,
    load_sweep,
    parse_sweep,
)
from scaling.executors import LocalExecutor
from scaling.flops import train_flops_per_token
from scaling.grid import COLUMNS, plan, row_for
from scaling.runner import execute_locked, run_sweep, status_tables
from scaling.store import SCHEMA_VERSION, connect, register_plan
from scaling.train import lr_at, train_run

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "sweeps" / "branches-check.toml"
OLD_STORE = Path(__file__).parent / "data" / "store_v1.duckdb.gz"  # written by schema version 1
BATCH, CONTEXT = 16, 32
BRANCHED = SweepConfig(name="t", budgets=(1.0,), variants=(Variant(1, 1),), unique_tokens=30_000,
                       schedule=Schedule(kind="wsd-branches"))


pytestmark = pytest.mark.usefixtures("shakespeare")


# ------------------------------------------------------------------------------------------------ schedule


def test_sqrt_cooldown_follows_hagele_shape():
    train = TrainConfig(lr=1e-2, min_lr_frac=0.1, schedule="wsd", decay_frac=0.2, decay_shape="sqrt",
                        warmup_steps=5)
    total, start, low = 100, 80, 1e-3
    lrs = [lr_at(s, train, total) for s in range(total)]
    assert lrs[:5] == pytest.approx([2e-3, 4e-3, 6e-3, 8e-3, 1e-2])  # warmup in steps, not a fraction of total
    assert lrs[5:start] == [1e-2] * (start - 5)
    for s in range(start, total):
        assert lrs[s] == pytest.approx(1e-2 - (1e-2 - low) * math.sqrt((s - start + 1) / (total - start)))
    assert lrs[-1] == pytest.approx(low) and all(a > b for a, b in zip(lrs[start - 1:], lrs[start:], strict=False))
    linear = replace(train, decay_shape="linear")
    assert lr_at(start + 4, linear, total) == pytest.approx(1e-2 - 9e-3 * 5 / 20)
    assert lr_at(start + 4, train, total) < lr_at(start + 4, linear, total)  # sqrt cools faster early on


def test_schedule_options_are_checked():
    base = {"name": "x", "budgets": [1e10], "unique_tokens": 1000, "sparsity": {"experts": [1]}}
    for schedule, message in [({"kind": "branches"}, "schedule.kind must be one of dedicated, wsd-branches"),
                              ({"cooldown": 1.5}, "schedule.cooldown must be a fraction"),
                              ({"decay_shape": "cosine"}, "schedule.decay_shape must be one of linear, sqrt"),
                              ({"cooldwn": 0.2}, "unknown key schedule.cooldwn (did you mean 'cooldown'?)")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_sweep({**base, "schedule": schedule})


def test_new_fields_at_their_defaults_keep_ids():
    spec = RunSpec(model=ModelConfig(), train=TrainConfig(), tokens=10_000, unique_tokens=5_000)
    canonical = spec.canonical()
    assert "trunk" not in canonical and "branch_steps" not in canonical
    assert "warmup_steps" not in canonical["train"] and "decay_shape" not in canonical["train"]
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).run_id == spec.run_id
    trunk = replace(spec, branch_steps=(3, 2))
    again = RunSpec.from_dict(json.loads(json.dumps(trunk.to_dict())))
    assert again.branch_steps == (2, 3) and again.run_id == trunk.run_id != spec.run_id


# ------------------------------------------------------------------------------------- plan and accounting


def test_spent_steps_splits_each_segment_among_its_users():
    # segment (0, 10] serves both branches (5 each), (10, 20] only the second
    assert spent_steps([10, 20], [12, 25]) == [5 + 2, 5 + 10 + 5]
    assert spent_steps([8, 8, 8], [10, 10, 10]) == pytest.approx([8 / 3 + 2] * 3)


@given(st.lists(st.tuples(st.integers(1, 1000), st.integers(1, 300)), min_size=1, max_size=8))
def test_spent_steps_sum_to_what_is_trained(points):
    starts, ends = [s for s, _ in points], [s + c for s, c in points]
    spent = spent_steps(starts, ends)
    assert sum(spent) == pytest.approx(max(starts) + sum(e - s for s, e in zip(starts, ends, strict=True)))
    assert all(0 < x <= e for x, e in zip(spent, ends, strict=True))


def test_branch_plan_trunks_accounting_and_ids():
    sweep = load_sweep(CHECK)
    runs = plan(sweep).runs
    trunks, branches = runs[runs.role == "trunk"], runs[runs.role == "branch"]
    assert len(trunks) + len(branches) == len(runs) and len(trunks) < len(branches)
    assert trunks.budget.isna().all() and branches.budget.notna().all()
    trained = 0.0
    for trunk in trunks.itertuples():
        mine = branches[branches.trunk_id == trunk.run_id]
        starts = [spec.cooldown_start for spec in mine.spec]
        assert trunk.spec.branch_steps == tuple(sorted(starts)) and trunk.spec.steps == max(starts)
        assert trunk.spec.train.schedule == "constant" and trunk.flops_spent == 0
        per_step = train_flops_per_token(trunk.spec.model) * BATCH * 64
        trained += trunk.flops + sum(per_step * (spec.steps - spec.cooldown_start) for spec in mine.spec)
        for spec in mine.spec:
            assert spec.trunk == trunk.run_id and spec.train.schedule == "wsd" and spec.train.decay_shape == "sqrt"
            assert spec.cooldown_start == spec.steps - round(0.2 * spec.steps)
            assert replace(spec, tokens=0, trunk="", train=replace(spec.train, schedule="constant")) == replace(
                trunk.spec, tokens=0, branch_steps=())  # the trunk is the branch before its cooldown
    assert runs.flops_spent.sum() == pytest.approx(trained, rel=1e-12)
    assert runs.flops_spent.sum() < branches.flops.sum()
    # the dedicated twin trains the same points under other ids
    twin = plan(dedicated_twin(sweep)).runs
    key = ["d_model", "n_layers", "n_experts", "tokens", "seed", "flops"]
    assert sorted(map(tuple, twin[key].values)) == sorted(map(tuple, branches[key].values))
    assert not set(twin.run_id) & set(runs.run_id) and (twin.role == "run").all()
    assert [s.train.schedule for s in twin.spec] == ["cosine"] * len(twin)


def test_lattice_makes_sizes_recur_across_budgets():
    sweep = replace(load_sweep(ROOT / "sweeps" / "demo.toml"), schedule=Schedule(kind="wsd-branches"))
    lattices = [lattice_sizes(b, sweep) for b in sweep.budgets]
    for a, b in zip(lattices, lattices[1:], strict=False):
        assert len(np.intersect1d(a, b)) >= 2  # the same floats: one lattice
    branched = plan(sweep).runs
    dedicated = plan(replace(sweep, schedule=Schedule())).runs
    points = branched[branched.role == "branch"]
    assert len(points) >= 0.85 * len(dedicated)  # a snapped size may land on a neighbour's shape (dropped)
    assert (branched.role == "trunk").sum() < 0.7 * len(points)  # most trunks serve several budgets


# ------------------------------------------------------------------------------------------ real training


def small_spec(steps: int, seed: int = 0, **model) -> RunSpec:
    cfg = ModelConfig(**{"vocab_size": 256, "context": CONTEXT, "d_model": 32, "n_layers": 2, "n_heads": 2,
                         "d_ff": 128, **model})
    train = TrainConfig(lr=3e-3, batch_size=BATCH, eval_tokens=2048, token_loss_tokens=512, log_every=5,
                        save_every=10, first_checkpoint_step=4, threads=1)
    return RunSpec(model=cfg, train=train, tokens=steps * BATCH * CONTEXT, unique_tokens=30_000, seed=seed)


def outputs(run_dir: Path) -> tuple[dict, dict]:
    result = json.loads((run_dir / "result.json").read_text())
    for row in result["metrics"]:
        row.pop("wall_s")
    with np.load(run_dir / "token_losses.npz") as z:
        return result, {k: z[k] for k in z.files}


@pytest.mark.parametrize("model", [{}, {"n_experts": 4, "top_k": 2, "router_noise": True}], ids=["dense", "moe"])
def test_branch_ends_exactly_where_a_dedicated_wsd_run_ends(model, tmp_path):
    """Both points of a trunk (D = 40 and 64 steps; 30 000 unique tokens: ~2 epochs), the trunk killed between
    the two branch starts and resumed: each branch's losses, curves and per-token losses are bit-identical to a
    dedicated wsd run of the same D, warmup and cooldown (router noise included: the RNG state travels)."""
    rows = pd.DataFrame([row_for(small_spec(steps, **model), budget=steps) for steps in (40, 64)], columns=COLUMNS)
    planned = branch_plan(rows, BRANCHED)
    trunk = planned[planned.role == "trunk"].spec.iloc[0]
    assert trunk.branch_steps == (32, 51) and trunk.steps == 51
    runs = tmp_path / "runs"
    stopped = train_run(trunk, runs / trunk.run_id, stop_after_steps=40)  # killed after the first branch start
    assert stopped["status"] == "interrupted" and branch_checkpoint(runs / trunk.run_id, 32).exists()
    assert train_run(trunk, runs / trunk.run_id)["status"] == "ok"
    assert "resuming at step 40" in (runs / trunk.run_id / "log.txt").read_text()
    assert not (runs / trunk.run_id / "checkpoint.pt").exists()  # the branch checkpoints stay
    for branch in planned[planned.role == "branch"].spec:
        assert blocked_on(branch.to_dict(), str(runs / branch.run_id)) is None
        train_run(branch, runs / branch.run_id)
        dedicated = replace(branch, trunk="")
        train_run(dedicated, tmp_path / "dedicated" / dedicated.run_id)
        (got, got_arrays), (want, want_arrays) = outputs(runs / branch.run_id), outputs(
            tmp_path / "dedicated" / dedicated.run_id)
        assert got["final_eval_loss"] == want["final_eval_loss"] and got["final_train_loss"] == want["final_train_loss"]
        assert got["metrics"] == want["metrics"] and got["router"] == want["router"]
        for key in want_arrays:
            np.testing.assert_array_equal(got_arrays[key], want_arrays[key])
        assert f"branching from trunk {trunk.run_id} at step {branch.cooldown_start}" in (
            runs / branch.run_id / "log.txt").read_text()


def test_a_branch_without_its_trunk_checkpoint_says_so(tmp_path):
    rows = pd.DataFrame([row_for(small_spec(20), budget=1.0)], columns=COLUMNS)
    branch = branch_plan(rows, BRANCHED).spec.iloc[0]
    assert blocked_on(branch.to_dict(), str(tmp_path / branch.run_id)) == tmp_path / branch.trunk / "branch-16.pt"
    with pytest.raises(FileNotFoundError, match=f"its trunk {branch.trunk} has no checkpoint at step 16"):
        train_run(branch, tmp_path / branch.run_id)


# ------------------------------------------------------------------------------------- store and comparison


def test_older_store_migrates_keeping_its_runs(tmp_path):
    db = tmp_path / "store.duckdb"
    with gzip.open(OLD_STORE) as src, open(db, "wb") as dst:
        shutil.copyfileobj(src, dst)
    reader = connect(db, read_only=True)  # a reader opens the old file as it is: no branches, no savings
    before = reader.execute("SELECT run_id, status, flops, final_eval_loss FROM runs ORDER BY run_id").fetchall()
    n_metrics = reader.execute("SELECT count(*) FROM metrics").fetchall()[0][0]
    assert "savings" not in status_tables(reader, "st") and len(before) == 2 and n_metrics > 0
    reader.close()
    con = connect(db)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [(str(SCHEMA_VERSION),)]
    after = con.execute("SELECT run_id, status, flops, final_eval_loss, role, trunk_id, flops_spent FROM runs "
                        "ORDER BY run_id").fetchall()
    assert [r[:4] for r in after] == before
    assert all(r[4] == "run" and r[5] is None and r[6] == r[2] for r in after)
    assert con.execute("SELECT count(*) FROM metrics").fetchall()[0][0] == n_metrics
    assert con.execute("SELECT count(*) FROM final_losses").fetchall()[0][0] == 2
    sweep = load_sweep(CHECK)  # a branching sweep lands in the migrated file
    register_plan(con, sweep, plan(sweep).runs, tmp_path / "runs")
    savings = status_tables(con, sweep.name)["savings"].iloc[0]
    assert 0.5 < savings.spent_frac < 1 and savings.trunks == 6
    assert "savings" not in status_tables(con, "st")
    con.close()
    assert connect(db).execute("SELECT count(*) FROM runs WHERE role = 'trunk'").fetchall() == [(6,)]


def test_compare_gives_the_difference_per_point_with_an_interval():
    rng = np.random.default_rng(0)
    rows = []
    for d_model, shift in ((16, 0.0), (24, 0.05)):
        for seed in range(4):
            base = 3.0 + rng.normal(0, 0.1)
            for schedule, loss in (("dedicated", base), ("branches", base + shift + rng.normal(0, 0.005))):
                rows.append({"n_experts": 1, "top_k": 1, "d_model": d_model, "n_layers": 1, "tokens": 100_000,
                             "unique_tokens": 50_000, "seed": seed, "epochs": 2.0, "schedule": schedule,
                             "loss": loss})
    rows.append({**rows[0], "seed": 9})  # a seed trained one way only is left out
    table = compare(pd.DataFrame(rows)).set_index("point")
    assert list(table.index) == ["d16x1 E1k1 D=1e+05 U=5e+04", "d24x1 E1k1 D=1e+05 U=5e+04", "all"]
    assert list(table.seeds) == [4, 4, 8] and table.epochs.iloc[0] == 2.0
    for point, shift in zip(table.index[:2], (0.0, 0.05), strict=True):
        assert table.loc[point, "ci_lo"] < shift < table.loc[point, "ci_hi"]
        assert table.loc[point, "ci_hi"] - table.loc[point, "ci_lo"] < 0.03
    assert table.loc["all", "diff"] == pytest.approx(0.025, abs=0.005)


# ------------------------------------------------------------------------------------------ through the runner

TINY = """
name = "tiny-branches"
corpus = "shakespeare"
unique_tokens = 100_000
budgets = [5e9, 1e10]
context = 64
max_epochs = 50
min_steps = 40
[sparsity]
experts = [1]
[sizes]
count = 2
span = 2.0
[shape]
rule = "size"
aspect_ratio = 16
head_dim = 8
min_d_model = 16
[schedule]
kind = "wsd-branches"
[train]
batch_size = 16
eval_tokens = 2048
token_loss_tokens = 512
save_every = 20
threads = 1
"""


def faulty(dies: str, spec: dict, run_dir: str) -> dict:
    """``execute_locked``, except that the worker of run ``dies`` exits once that run has written a checkpoint."""
    if Path(run_dir).name == dies:
        def exit_after_checkpoint() -> None:
            while not (Path(run_dir) / "checkpoint.pt").exists():
                time.sleep(0.002)
            os._exit(3)

        threading.Thread(target=exit_after_checkpoint, daemon=True).start()
    return execute_locked(spec, run_dir)


@pytest.mark.slow
def test_killed_trunk_fails_its_waiting_branches_then_resumes_and_each_branch_trains_once(tmp_path):
    """A trunk's worker dies mid-run with no retries left: the branches still waiting for it fail (their trunk
    stopped), the other trunk's branches finish. A rerun retries the trunk, which resumes from its checkpoint, and
    trains each waiting branch exactly once; the points' eval losses are those of the stored branches."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    sweep = load_sweep(path)
    runs = plan(sweep).runs
    trunks = runs[runs.role == "trunk"].sort_values("steps")
    dies = trunks.run_id.iloc[-1]  # the longer trunk: its branches start after its first checkpoint (step 20)
    assert min(s.cooldown_start for s in runs[runs.trunk_id == dies].spec) > 20
    con = connect(tmp_path / "results.duckdb")
    executor = LocalExecutor(workers=2, fn=functools.partial(faulty, dies))
    try:
        first = run_sweep(con, sweep, executor, tmp_path / "runs", retries=0)
    finally:
        executor.shutdown(cancel=True)
    # the branches whose checkpoint the trunk did not reach (all of them, unless the dying worker was starved)
    orphans = {row.run_id for row in runs[runs.trunk_id == dies].itertuples()
               if not branch_checkpoint(tmp_path / "runs" / dies, row.spec.cooldown_start).exists()}
    assert orphans
    status = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
    assert status[dies] == "failed" and {status[r] for r in orphans} == {"failed"}
    assert {status[r] for r in set(runs.run_id) - orphans - {dies}} == {"ok"}
    errors = dict(con.execute("SELECT run_id, error FROM runs WHERE status = 'failed'").fetchall())
    assert all(f"its trunk {dies} is not training" in errors[r] for r in orphans)
    assert first.counts == {"ok": len(runs) - len(orphans) - 1, "failed": len(orphans) + 1}

    executor = LocalExecutor(workers=2, fn=execute_locked)
    try:
        second = run_sweep(con, sweep, executor, tmp_path / "runs", retries=1)
    finally:
        executor.shutdown(cancel=True)
    assert second.counts == {"ok": len(orphans) + 1} and second.failed == 0
    assert "resuming at step 20" in (tmp_path / "runs" / dies / "log.txt").read_text()
    for run_id in runs[runs.role == "branch"].run_id:
        text = (tmp_path / "runs" / run_id / "log.txt").read_text()
        assert len(re.findall(r"branching from trunk", text)) == 1, text
    points = con.execute("SELECT count(*), count(DISTINCT run_id) FROM isoflop_points").fetchall()[0]
    assert points == ((runs.role == "branch").sum(),) * 2  # trunks are no isoFLOP points
    savings = status_tables(con, sweep.name)["savings"].iloc[0]
    assert savings.flops_spent == pytest.approx(runs.flops_spent.sum()) and savings.spent_frac < 1
    con.close()


@pytest.mark.slow
def test_scaling_run_trains_trunks_and_branches_and_status_says_what_it_saved(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    db, runs_dir = tmp_path / "results.duckdb", tmp_path / "runs"
    env = {**os.environ, "SCALING_CACHE": str(REPO_CACHE)}
    command = [sys.executable, "-c", "from scaling.cli import main; main()"]
    done = subprocess.run([*command, "run", str(path), "--workers", "2", "--db", str(db), "--runs-dir",
                           str(runs_dir)], capture_output=True, text=True, env=env, timeout=600)
    planned = plan(load_sweep(path)).runs
    assert done.returncode == 0, done.stderr
    assert f"tiny-branches: {len(planned)} ok" in done.stderr
    status = subprocess.run([*command, "status", "tiny-branches", "--db", str(db), "--format", "json"],
                            capture_output=True, text=True, env=env, timeout=120)
    savings = json.loads(status.stdout)["savings"][0]
    branches = planned[planned.role == "branch"]
    assert savings["points"] == len(branches) and savings["trunks"] == (planned.role == "trunk").sum()
    assert savings["flops"] == pytest.approx(branches.flops.sum())
    assert savings["flops_spent"] == pytest.approx(planned.flops_spent.sum()) and savings["spent_frac"] < 0.9
    con = connect(db, read_only=True)
    stored = dict(con.execute("SELECT run_id, loss FROM isoflop_points").fetchall())
    con.close()
    assert sorted(stored) == sorted(branches.run_id)
    for run_id, loss in stored.items():
        assert loss == json.loads((runs_dir / run_id / "result.json").read_text())["final_eval_loss"]


def test_branch_check_needs_a_branching_sweep(tmp_path):
    command = [sys.executable, "-c", "from scaling.cli import main; main()"]
    done = subprocess.run([*command, "branch-check", str(ROOT / "sweeps" / "smoke.toml"), "--db",
                           str(tmp_path / "x.duckdb")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and not (tmp_path / "x.duckdb").exists()  # a config error
    assert done.stderr.strip() == ('error: ' + str(ROOT / "sweeps" / "smoke.toml") +
                                   ': branch-check needs a sweep with [schedule] kind = "wsd-branches"')


@pytest.mark.slow
@pytest.mark.slurm
def test_branches_on_slurm_survive_a_driver_sigkill_and_train_each_run_once(tmp_path):
    """The branching sweep on a real Slurm: the driver is SIGKILLed once a branch is in flight and started again.
    The new driver attaches to the jobs in flight (no run is submitted twice), every trunk and branch ends ok,
    each branch starts from its trunk exactly once, and the stored points are the branches' results."""
    from test_slurm import cluster_problem

    if problem := cluster_problem():
        pytest.skip(f"needs a Slurm cluster, e.g. `sudo scripts/local-slurm.sh start`: {problem}")
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    planned = plan(load_sweep(path)).runs
    db, runs_dir = tmp_path / "results.duckdb", tmp_path / "runs"
    jobs_file = runs_dir / "_slurm" / "jobs.json"
    command = [sys.executable, "-c", "from scaling.cli import main; main()", "run", str(path), "--executor",
               "slurm", "--cpus-per-task", "1", "--time-min", "10", "--db", str(db), "--runs-dir", str(runs_dir)]
    env = {**os.environ, "SCALING_CACHE": str(REPO_CACHE)}
    branches = set(planned[planned.role == "branch"].run_id)

    def submitted() -> dict[str, str]:
        try:
            return {run_id: job["job_id"] for run_id, job in json.loads(jobs_file.read_text()).items()}
        except (OSError, ValueError):
            return {}

    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=tmp_path,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (branches & set(submitted())):  # a trunk has reached a branch point and its branch is queued
            assert first.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "no branch was submitted in 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, 9)
        first.wait()
    before = submitted()
    try:
        second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    finally:
        left = [job for run_id, job in submitted().items() if not (runs_dir / run_id / "result.json").exists()]
        if left:
            subprocess.run(["scancel", *left], capture_output=True)
    assert second.returncode == 0, second.stderr[-3000:]
    after = submitted()
    assert {run_id: after[run_id] for run_id in before} == before  # attached, not submitted again
    con = connect(db, read_only=True)
    status = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
    stored = dict(con.execute("SELECT run_id, loss FROM isoflop_points").fetchall())
    con.close()
    assert status == dict.fromkeys(planned.run_id, "ok")
    assert sorted(stored) == sorted(branches)
    for run_id in branches:
        text = (runs_dir / run_id / "log.txt").read_text()
        assert len(re.findall(r"branching from trunk", text)) == 1, text
        assert stored[run_id] == json.loads((runs_dir / run_id / "result.json").read_text())["final_eval_loss"]
    for run_id in set(planned.run_id) - branches:  # a trunk starts once; it resumes only if Slurm requeued it
        assert (runs_dir / run_id / "log.txt").read_text().count(f"starting run {run_id}") == 1
