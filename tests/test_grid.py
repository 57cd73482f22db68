"""Sweep files and the grid generator: budgets respected, ids stable, bad input rejected clearly."""

import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaling.config import ConfigError, load_sweep, parse_sweep
from scaling.grid import plan

ROOT = Path(__file__).resolve().parents[1]


def base(**overrides):
    raw = {"name": "t", "budgets": [1e11, 1e12], "unique_tokens": 500_000, "context": 64,
           "sparsity": {"experts": [1, 4], "top_k": 1}, "sizes": {"count": 3, "span": 6.0},
           "train": {"batch_size": 16}}
    raw.update(overrides)
    return raw


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.toml")), ids=lambda path: path.stem)
def test_shipped_sweeps_plan_what_their_comments_say(path):
    runs = plan(load_sweep(path)).runs
    points = runs[runs["role"] != "trunk"]
    assert (abs(points.flops / points.budget - 1) < 0.01).all()
    assert (runs.epochs == runs.tokens / runs.unique_tokens).all()
    assert runs.run_id.is_unique
    said = re.search(r"^# (\d+) runs", path.read_text(), re.MULTILINE)
    if said:
        assert int(said.group(1)) == len(runs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budgets=st.lists(st.floats(3e10, 3e12), min_size=1, max_size=3),
       experts=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=3, unique=True),
       unique=st.integers(50_000, 5_000_000), max_epochs=st.floats(1.0, 50.0), count=st.integers(1, 5))
def test_grid_invariants(budgets, experts, unique, max_epochs, count):
    raw = base(budgets=budgets, sparsity={"experts": experts, "top_k": 1}, unique_tokens=unique,
               max_epochs=max_epochs, min_steps=50, sizes={"count": count, "span": 8.0})
    try:
        p = plan(parse_sweep(raw))
    except ConfigError as e:
        assert "no run fits" in str(e)
        return
    runs = p.runs
    assert (runs.steps >= 50).all()
    assert (abs(runs.flops / runs.budget - 1) <= 0.01).all()
    assert (runs.epochs <= max_epochs + 1e-9).all()
    assert ((runs.epochs - runs.tokens / runs.unique_tokens).abs() < 1e-12).all()
    assert set(runs.sparsity) <= {(e - 1) / e for e in experts}
    reasons = {"fewer", "more", "duplicate", "budget"}
    assert len(p.dropped) == 0 or set(p.dropped.reason.str.split(" ").str[0]) <= reasons


def test_ids_stable_across_runs_and_key_order(tmp_path):
    a = tmp_path / "a.toml"
    b = tmp_path / "b.toml"
    a.write_text('name = "x"\nunique_tokens = 400000\nbudgets = [1e11]\n[sparsity]\nexperts = [1, 8]\n'
                 '[train]\nlr = 0.002\nbatch_size = 16\n')
    b.write_text('[train]\nbatch_size = 16\nlr = 0.002\n[sparsity]\nexperts = [1, 8]\n'
                 '\n', )
    b.write_text('budgets = [1e11]\nunique_tokens = 400_000\nname = "x"\n' + b.read_text())
    ids_a = list(plan(load_sweep(a)).runs.run_id)
    assert ids_a == list(plan(load_sweep(a)).runs.run_id)
    assert sorted(ids_a) == sorted(plan(load_sweep(b)).runs.run_id)
    c = tmp_path / "c.toml"
    c.write_text(a.read_text().replace("lr = 0.002", "lr = 0.003"))
    assert not set(ids_a) & set(plan(load_sweep(c)).runs.run_id)


TOP = 'name = "x"\nunique_tokens = 1000\nbudgets = [1e11]\n'
OK_SPARSITY = "[sparsity]\nexperts = [1]\n"


@pytest.mark.parametrize("text, message", [
    (TOP + "[sparsity]\nexperts = 8\n", "sparsity.experts must be a non-empty list"),
    (TOP + "[sparsity]\nlevels = 0.5\n", "sparsity.levels must be a non-empty list"),
    (TOP + "[sparsity]\nexperts = [2.5]\n", "sparsity.experts must be a whole number"),
    (TOP + "repeat = 5\n" + OK_SPARSITY, "repeat must be a table"),
    (TOP + "train = 5\n" + OK_SPARSITY, "train must be a table"),
    (TOP + "corpus = 3\n" + OK_SPARSITY, "corpus must be a name or a path"),
    (TOP + "seeds = [true]\n" + OK_SPARSITY, "seeds must be a non-empty list"),
    (TOP + OK_SPARSITY + "[repeat]\nseeds = ['a']\n", "repeat.seeds must be a non-empty list"),
    (TOP + OK_SPARSITY + "[train]\nlr_ref_width = 'x'\n", "train.lr_ref_width must be a whole number"),
    (TOP + OK_SPARSITY + "[train]\nlr_ref_width = -5\n", "train.lr_ref_width must be a whole number"),
    (TOP + OK_SPARSITY + "[train]\nweight_decay = -0.1\n", "train.weight_decay must be >= 0"),
    (TOP + OK_SPARSITY + "[train]\ngrad_clip = 0\n", "train.grad_clip must be positive"),
    (TOP + OK_SPARSITY + "[shape]\nhead_dim = 0\n", "shape.head_dim must be positive"),
    (TOP + OK_SPARSITY + "[shape]\naspect_ratio = -3\n", "shape.aspect_ratio must be positive"),
    (TOP + OK_SPARSITY + "[shape]\nffn_mult = 0\n", "shape.ffn_mult must be positive"),
    (TOP + OK_SPARSITY + "[sizes]\ncenter = -1\n", "center >= 0"),
    (TOP + OK_SPARSITY + "[executor]\npartition = 3\n", "executor.partition must be a string"),
    (TOP + OK_SPARSITY + "[executor]\ncpus_per_task = 1.5\n", "executor.cpus_per_task must be a whole number"),
    (TOP + OK_SPARSITY + "[executor]\ngpus_per_node = -1\n", "executor.gpus_per_node must be a whole number >= 0"),
    (TOP + OK_SPARSITY + "[shape]\naspect_ratio = nan\n", "shape.aspect_ratio must be a finite number"),
    (TOP + OK_SPARSITY + "[sizes]\ntokens_per_param = inf\n", "sizes.tokens_per_param must be a finite number"),
    (TOP + OK_SPARSITY + "[train]\ngrad_clip = nan\n", "train.grad_clip must be a finite number"),
])
def test_bad_values_are_one_clear_error(tmp_path, text, message):
    """Wrong types and impossible values: a ConfigError naming the file and the key, never a traceback."""
    assert_rejected(tmp_path, text, message)


@pytest.mark.parametrize("text, message", [
    ('name = "x"\nbudgets = [1e11\n', "malformed TOML"),
    ('name = "x"\nunique_tokens = 1000\nbudgets = [1e11]\nbudgts = 3\n[sparsity]\nexperts=[1]\n',
     "did you mean 'budgets'"),
    ('name = "x"\nunique_tokens = 1000\nbudgets = [-1e11]\n[sparsity]\nexperts=[1]\n', "budgets[0]"),
    ('name = "x"\nunique_tokens = 0\nbudgets = [1e11]\n[sparsity]\nexperts=[1]\n', "unique_tokens"),
    ('name = "x"\nunique_tokens = 1000\nbudgets = [1e11]\n[sparsity]\nexperts=[1]\n[train]\nlrr = 1\n',
     "did you mean 'lr'"),
    ('name = "x"\nunique_tokens = 1000\nbudgets = [1e3]\n[sparsity]\nexperts=[1]\n', "no run fits"),
    ('name = "x"\nunique_tokens = 1000\nbudgets = [1e11]\n[sparsity]\nlevels=[0.3]\n', "whole number"),
])
def test_bad_sweep_files(tmp_path, text, message):
    assert_rejected(tmp_path, text, message)


def assert_rejected(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        plan(load_sweep(path))
    assert message in str(info.value)
    assert "bad.toml" in str(info.value)


def test_executor_table_accepts_what_the_executor_takes():
    sweep = parse_sweep(base(executor={"gpus_per_node": 0, "mem_gb": 1.5, "cpus_per_task": 2, "partition": "debug"}))
    assert sweep.executor == {"gpus_per_node": 0, "mem_gb": 1.5, "cpus_per_task": 2, "partition": "debug"}


def test_budget_tolerance_and_capped_shapes_are_reported():
    """Runs too short to land within 1% of their budget, and sizes the shape rules collapse onto one shape, are
    dropped with their reason, never silently kept or merged."""
    p = plan(parse_sweep(base(budgets=[2e10], min_steps=1, sparsity={"experts": [1]}, sizes={"count": 5, "span": 8.0},
                              shape={"head_dim": 8, "min_d_model": 8}, train={"batch_size": 128})))
    assert (abs(p.runs.flops / p.runs.budget - 1) <= 0.01).all()
    assert p.dropped.reason.str.startswith("budget missed").any()
    capped = plan(parse_sweep(base(budgets=[1e20], unique_tokens=10**13, sparsity={"experts": [1]}, sizes={"count": 5},
                                   shape={"head_dim": 8, "max_layers": 4})))
    assert len(capped.runs) + (capped.dropped.reason.str.startswith("duplicate shape")).sum() == 5
    assert capped.dropped.reason.str.startswith("duplicate shape").any()


def test_aspect_rule_grows_width_and_depth_together():
    """The default shape rule: depth = round(d_model / aspect_ratio), so a sweep's sizes form one family (depth
    never falls as width grows); the "size" rule may pick any depth."""
    raw = base(budgets=[1e11, 1e12, 1e13], sizes={"count": 6, "span": 30.0},
               shape={"aspect_ratio": 16, "head_dim": 8, "min_d_model": 8, "max_layers": 6})
    runs = plan(parse_sweep(raw)).runs.sort_values("d_model")
    assert runs.n_layers.is_monotonic_increasing
    expected = (runs.d_model / 16).round().clip(1, 6)
    assert (runs.n_layers == expected).all()
    loose = plan(parse_sweep({**raw, "shape": {**raw["shape"], "rule": "size"}})).runs
    assert not (loose.n_layers == (loose.d_model / 16).round().clip(1, 6)).all()
    with pytest.raises(ConfigError, match="shape.rule must be 'aspect' or 'size'"):
        parse_sweep({**raw, "shape": {"rule": "square"}})


def test_levels_and_repeat_seeds():
    sweep = parse_sweep(base(sparsity={"levels": [0, 0.5, 0.875], "top_k": 1},
                             repeat={"seeds": [1], "budgets": [1e12]}))
    assert [v.n_experts for v in sweep.variants] == [1, 2, 8]
    runs = plan(sweep).runs
    assert set(runs[runs.budget == 1e12].seed) == {0, 1}
    assert set(runs[runs.budget == 1e11].seed) == {0}
    assert math.isclose(runs.sparsity.max(), 0.875)
