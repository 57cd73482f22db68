"""Run ids are users' keys: the same plan keeps its ids when the spec gains an option with a default."""

import dataclasses
import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import tomllib

from scaling.config import ROUTERS, ModelConfig, RunSpec, TrainConfig, load_sweep, parse_sweep
from scaling.grid import plan
from scaling.runner import dry_run
from scaling.store import connect

SWEEP = {"name": "ids", "budgets": [1e11, 1e12], "unique_tokens": 500_000, "context": 64,
         "sparsity": {"experts": [1, 4], "top_k": 1}, "sizes": {"count": 3, "span": 6.0},
         "train": {"batch_size": 16}}
# sha256 of the sorted ids of SWEEP's plan, as first hashed (spec version 1). If this changes, stored runs lose
# their ids: ship a migration instead of editing this line.
PLANNED_IDS = "d2903d86f482dca4"


def planned_specs() -> list[RunSpec]:
    return list(plan(parse_sweep(dict(SWEEP))).runs.spec)


def digest(specs: list[RunSpec]) -> str:
    return hashlib.sha256(",".join(sorted(s.run_id for s in specs)).encode()).hexdigest()[:16]


def test_plan_ids_are_those_first_hashed():
    specs = planned_specs()
    assert digest(specs) == PLANNED_IDS
    assert all("router" in s.to_dict()["model"] and "router" not in s.canonical()["model"] for s in specs)
    moe = next(s for s in specs if s.model.is_moe)
    routed = dataclasses.replace(moe, model=dataclasses.replace(moe.model, router="sigmoid-topk"))
    assert routed.canonical()["model"]["router"] == "sigmoid-topk" and routed.run_id != moe.run_id


@pytest.mark.parametrize("section", ["model", "train"])
def test_a_new_option_at_its_default_keeps_every_id(section):
    cls = {"model": ModelConfig, "train": TrainConfig}[section]
    grown = dataclasses.make_dataclass(cls.__name__, [("new_option", float, dataclasses.field(default=0.5))],
                                       bases=(cls,), frozen=True)

    def regrow(spec: RunSpec, **new) -> RunSpec:
        values = {**spec.to_dict()[section], **new}
        return dataclasses.replace(spec, **{section: grown(**values)})

    specs = [regrow(s) for s in planned_specs()]
    assert all(s.to_dict()[section]["new_option"] == 0.5 for s in specs)  # the field is really there
    assert digest(specs) == PLANNED_IDS
    assert regrow(specs[0], new_option=0.7).run_id != specs[0].run_id  # ... and counts once it is set


STORED = Path(__file__).resolve().parent / "data" / "moe_ids_v4"  # moe_ids.toml, trained and ingested by the release
# before model.router existed (store schema version 4): 11 ok runs, dense and MoE, with router noise


@pytest.fixture
def stored_sweep(tmp_path) -> Path:
    db = tmp_path / "store.duckdb"
    with gzip.open(STORED / "store_v4.duckdb.gz") as src, open(db, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return db


def test_a_stored_sweep_keeps_its_ids_with_the_router_option(stored_sweep):
    con = connect(stored_sweep)  # a writer, as ``scaling run`` opens it
    try:
        stored = dict(con.execute("SELECT run_id, spec FROM runs WHERE status = 'ok'").fetchall())
        routed = con.execute("SELECT count(DISTINCT run_id) FROM router_stats").fetchall()[0][0]
    finally:
        con.close()
    assert len(stored) == 11 and routed == 7  # the MoE runs' router rows read by name
    specs = {run_id: RunSpec.from_dict(json.loads(spec)) for run_id, spec in stored.items()}
    assert all("router" not in json.loads(spec)["model"] for spec in stored.values())  # written before the option
    assert {s.model.router for s in specs.values()} == {next(iter(ROUTERS))}  # ... which takes its default
    assert {run_id: s.run_id for run_id, s in specs.items()} == {run_id: run_id for run_id in stored}
    sweep = load_sweep(STORED / "moe_ids.toml")
    assert set(plan(sweep).runs.run_id) == set(stored)  # re-planning finds every run done
    assert not needs_training(stored_sweep, sweep)

    raw = tomllib.loads((STORED / "moe_ids.toml").read_text())
    raw["model"]["router"] = "sigmoid-topk"
    other = plan(parse_sweep(raw)).runs
    dense = other.n_experts == 1
    assert set(other.run_id[dense]) <= set(stored)  # dense runs have no router: the same runs
    assert not set(other.run_id[~dense]) & set(stored) and (~dense).sum() == 7  # another router: other runs


def needs_training(db: Path, sweep) -> bool:
    return bool((dry_run(str(db), sweep, retries=0).status != "ok").any())
