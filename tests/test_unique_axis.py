"""U (unique tokens) as a swept axis: every (U, budget, sparsity, size, seed) planned; one U plans as before."""

import hashlib
from pathlib import Path

import pytest

from scaling.config import ConfigError, load_sweep, parse_sweep
from scaling.grid import plan

ROOT = Path(__file__).resolve().parents[1]
IDS_BEFORE = {  # sha256 of the space-joined run ids, planned by the release before U could be a list
    ROOT / "tests" / "fixtures" / "demo_before_unique_axis.toml": "b0e5ee4a916c6e0e",
    ROOT / "sweeps" / "smoke.toml": "3d1db1341a34d2f4",
}
RAW = {"name": "u", "budgets": [1e11, 3e11], "unique_tokens": 500_000, "context": 64, "max_epochs": 50,
       "sparsity": {"experts": [1, 4]}, "sizes": {"count": 3, "span": 6.0}, "train": {"batch_size": 16}}


@pytest.mark.parametrize("path", list(IDS_BEFORE))
def test_one_unique_token_value_keeps_run_ids(path):
    ids = plan(load_sweep(path)).runs.run_id
    assert hashlib.sha256(" ".join(ids).encode()).hexdigest()[:16] == IDS_BEFORE[path]


def test_unique_token_list_plans_every_level():
    one = {u: plan(parse_sweep({**RAW, "unique_tokens": u})).runs for u in (100_000, 500_000)}
    sweep = parse_sweep({**RAW, "unique_tokens": [500_000, 100_000]})
    assert sweep.unique_token_values == (100_000, 500_000) and sweep.unique_tokens == 500_000
    runs = plan(sweep).runs
    assert sorted(runs.run_id) == sorted([*one[100_000].run_id, *one[500_000].run_id])
    assert runs.run_id.is_unique
    assert set(runs.unique_tokens) == {100_000, 500_000}
    assert ((runs.epochs - runs.tokens / runs.unique_tokens).abs() < 1e-12).all()


def test_max_epochs_drops_only_the_scarce_points():
    p = plan(parse_sweep({**RAW, "unique_tokens": [20_000, 10_000_000], "max_epochs": 30}))
    assert (p.runs.epochs <= 30).all()
    too_many = p.dropped[p.dropped.reason.str.startswith("more than max_epochs")]
    assert len(too_many) and set(too_many.unique_tokens) == {20_000}


@pytest.mark.parametrize(("value", "message"), [
    ([500_000], "2 or more values"),
    ([500_000, 500_000], "twice"),
    ([500_000, 2.5e4 + 0.5], "whole number"),
    ([500_000, -1], "unique_tokens[1]"),
    ("many", "positive number"),
])
def test_bad_unique_token_lists(value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_sweep({**RAW, "unique_tokens": value})
