"""Run ids are users' keys: the same plan keeps its ids when the spec gains an option with a default."""

import dataclasses
import hashlib

import pytest

from scaling.config import ModelConfig, RunSpec, TrainConfig, parse_sweep
from scaling.grid import plan

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
    assert digest(planned_specs()) == PLANNED_IDS


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
