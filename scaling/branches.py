"""Trunks and cooldown branches (Hägele et al. 2024, arXiv 2405.18392): plan, FLOPs accounting, comparison.

With ``[schedule] kind = "wsd-branches"`` the points of a sweep that share a shape, sparsity, seed and U share one
trunk: a run at constant LR (after the warmup) to the latest step any of them branches at. The point of D tokens
is a branch: a wsd run of D tokens whose cooldown covers the last ``cooldown`` fraction of D with the (1 − sqrt)
shape, started from the trunk's checkpoint at the cooldown's first step. Up to there a dedicated wsd run of D has
the same LR, data (a function of the step alone) and RNG, so the branch ends exactly where that run would.

Accounting: ``flops`` is what a point represents (its D tokens); ``flops_spent`` is its cooldown plus its share of
the trunk, each trunk segment split evenly among the branches that start after it, so a sweep's ``flops_spent``
sums to the FLOPs it trains (a trunk's own ``flops_spent`` is 0: its branches carry it).

A branch's record continues its trunk's: its curves start at step 0, and its ``wall_s`` and ``train_s`` include the
trunk's time up to the branch start.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from scaling.config import RunSpec, SweepConfig, cooldown_start, warmup_steps
from scaling.flops import flops_6nd, train_flops_per_token


def trunk_dir(run_dir: str | Path, trunk_id: str) -> Path:
    """A branch's trunk lives beside it: every run of a store's runs directory is ``<runs_dir>/<run_id>``."""
    return Path(run_dir).parent / trunk_id


def branch_checkpoint(trunk: str | Path, step: int) -> Path:
    """The trunk checkpoint that branches starting at ``step`` load (kept after the trunk has finished)."""
    return Path(trunk) / f"branch-{step}.pt"


def blocked_on(spec: dict, run_dir: str) -> Path | None:
    """The trunk checkpoint a branch still waits for: None for a run that is not a branch, a branch whose
    checkpoint exists, and a branch that has a checkpoint of its own (it resumes from that)."""
    trunk = spec.get("trunk")
    if not trunk or (Path(run_dir) / "checkpoint.pt").exists():
        return None
    path = branch_checkpoint(trunk_dir(run_dir, trunk), RunSpec.from_dict(spec).cooldown_start)
    return None if path.exists() else path


def lattice_sizes(budget: float, sweep: SweepConfig) -> np.ndarray:
    """``sizes.count`` active-param targets around the budget's estimated optimum (as ``grid.target_sizes``),
    snapped to the one log lattice of step span^(1 / (count − 1)) that every budget shares, so that a size
    recurs from one budget to the next and its points share a trunk."""
    sizes = sweep.sizes
    center = math.sqrt(budget / (6 * sizes.tokens_per_param)) * (sizes.center or 1.0)
    if sizes.count == 1:
        return np.array([center])
    step = math.log(sizes.span) / (sizes.count - 1)
    first = round(math.log(center) / step - (sizes.count - 1) / 2)
    return np.exp((first + np.arange(sizes.count)) * step)


def spent_steps(starts: list[int], ends: list[int]) -> list[float]:
    """Steps spent per branch (start s_i, end D_i): its cooldown D_i − s_i plus its share of the trunk, each
    segment between consecutive distinct starts split evenly among the branches that run through it. The sum is
    max(starts) + Σ (D_i − s_i): what the trunk and the branches train."""
    cuts = sorted(set(starts))
    share, previous, before = {}, 0, 0.0
    for cut in cuts:
        users = sum(s >= cut for s in starts)
        before += (cut - previous) / users
        share[cut], previous = before, cut
    return [share[s] + (d - s) for s, d in zip(starts, ends, strict=True)]


def branch_plan(runs: pd.DataFrame, sweep: SweepConfig) -> pd.DataFrame:
    """Turn planned dedicated runs (``grid.plan`` rows) into one trunk per (shape, sparsity, seed, U) and a
    branch per point. All of a trunk's branches warm up as its shortest point would (``warmup_frac`` of it)."""
    out = []
    schedule = sweep.schedule
    for _, group in runs.groupby(runs.spec.map(lambda s: replace(s, tokens=0)), sort=False):
        group = group.sort_values("tokens")
        first: RunSpec = group.spec.iloc[0]
        warmup = warmup_steps(first.train, first.steps)
        train = replace(first.train, schedule="wsd", decay_frac=schedule.cooldown,
                        decay_shape=schedule.decay_shape, warmup_steps=warmup,
                        warmup_frac=first.train.warmup_frac if warmup else 0.0)
        steps = group.steps.tolist()
        starts = [cooldown_start(train, d) for d in steps]
        trunk = replace(first, train=replace(train, schedule="constant"), branch_steps=tuple(starts),
                        tokens=max(starts) * first.train.batch_size * first.model.context)
        fpt = train_flops_per_token(first.model) * first.train.batch_size * first.model.context  # per step
        for row, spent in zip(group.to_dict("records"), spent_steps(starts, steps), strict=True):
            spec = replace(row["spec"], train=train, trunk=trunk.run_id)
            out.append({**row, "run_id": spec.run_id, "spec": spec, "role": "branch", "trunk_id": trunk.run_id,
                        "flops_spent": fpt * spent})
        out.append({**group.iloc[0].to_dict(), "run_id": trunk.run_id, "spec": trunk, "budget": None,
                    "flops": train_flops_per_token(trunk.model) * trunk.tokens,
                    "flops_6nd": flops_6nd(trunk.model, trunk.tokens), "steps": trunk.steps,
                    "tokens": trunk.tokens, "epochs": trunk.tokens / trunk.unique_tokens, "role": "trunk",
                    "trunk_id": None, "flops_spent": 0.0})
    return pd.DataFrame(out, columns=runs.columns).reset_index(drop=True)


def trained_flops(runs: pd.DataFrame) -> pd.Series:
    """FLOPs each planned run trains itself (``grid.plan`` rows): a branch only its cooldown, others all of theirs."""
    def own(row: dict) -> float:
        spec = row["spec"]
        if row["role"] != "branch":
            return row["flops"]
        return row["flops"] * (spec.steps - spec.cooldown_start) / spec.steps

    return pd.Series([own(row) for row in runs.to_dict("records")], index=runs.index, dtype=float)


POINT = ["n_experts", "top_k", "d_model", "n_layers", "tokens", "unique_tokens"]
COMPARED = ["point", "epochs", "seeds", "dedicated", "branches", "diff", "ci_lo", "ci_hi", "rel_diff"]


def compare(points: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Loss of branches minus dedicated runs, per point (same shape, D and U) over the seeds both have, with a
    Student-t interval over those seeds; and an ``all`` row over every (point, seed) pair (pairs that share a
    trunk are not independent: read its interval as indicative). ``points``: columns ``schedule``
    ("branches" or "dedicated"), ``seed``, ``loss``, ``epochs`` and POINT."""
    wide = points.pivot_table(index=[*POINT, "seed"], columns="schedule", values="loss").dropna()
    if wide.empty or not {"branches", "dedicated"} <= set(wide.columns):
        return pd.DataFrame(columns=COMPARED)
    wide = wide.assign(diff=wide.branches - wide.dedicated).reset_index()
    rows = [{"point": "d{}x{} E{}k{} D={:.3g} U={:.3g}".format(*key[2:4], *key[:2], *key[4:]),
             "epochs": key[4] / key[5], **summary(group, level)} for key, group in wide.groupby(POINT, sort=True)]
    rows.append({"point": "all", "epochs": math.nan, **summary(wide, level)})
    return pd.DataFrame(rows, columns=COMPARED)


def summary(pairs: pd.DataFrame, level: float) -> dict:
    """Mean loss each way, mean difference and its t interval (none from a single pair)."""
    from scipy.stats import t  # here: planning (grid, store) imports this module and needs no scipy

    n, diff = len(pairs), pairs["diff"].to_numpy()
    half = (t.ppf(0.5 + level / 2, n - 1) * diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"seeds": n, "dedicated": pairs.dedicated.mean(), "branches": pairs.branches.mean(),
            "diff": diff.mean(), "ci_lo": diff.mean() - half, "ci_hi": diff.mean() + half,
            "rel_diff": diff.mean() / pairs.dedicated.mean()}


def sweep_points(con: duckdb.DuckDBPyConnection, sweeps: dict[str, str]) -> pd.DataFrame:
    """Final eval losses of finished points of each sweep, labelled ``schedule`` by ``sweeps`` (name → label)."""
    frames = [con.execute(f"SELECT {', '.join(POINT)}, seed, epochs, final_eval_loss AS loss FROM final_losses "
                          "WHERE sweep = ?", [name]).df().assign(schedule=label) for name, label in sweeps.items()]
    return pd.concat(frames, ignore_index=True)


def dedicated_twin(sweep: SweepConfig) -> SweepConfig:
    """The same grid trained as dedicated runs (``train.schedule``, cosine by default): the reference branches
    are checked against. Its size lists are the branching sweep's lattice, so both have the same points."""
    return replace(sweep, name=f"{sweep.name}-dedicated",
                   schedule=replace(sweep.schedule, kind="dedicated", lattice=True))


def savings_note(runs: pd.DataFrame) -> str:
    """What branching saved, from a sweep's ``runs`` rows (role, flops, flops_spent); empty without branches."""
    if "role" not in runs or not (runs.role == "branch").any():
        return ""
    points = runs[runs.role != "trunk"]
    spent, represented = runs.flops_spent.sum(), points.flops.sum()
    return (f"{len(points)} points from {int((runs.role == 'trunk').sum())} trunks with cooldown branches: "
            f"{spent:.3g} FLOPs trained for the {represented:.3g} the points represent ({spent / represented:.0%})")
