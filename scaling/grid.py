"""The sweep generator: budgets x sparsities x active-parameter sizes -> planned runs with stable ids."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from scaling.branches import branch_plan, lattice_sizes
from scaling.config import ConfigError, ModelConfig, RunSpec, SweepConfig, Variant, build, with_lr
from scaling.flops import expert_sparsity, flops_6nd, param_counts, param_sparsity, train_flops_per_token


@dataclass(frozen=True)
class Plan:
    """Planned runs (one row each, ``spec`` holds the RunSpec) and the points dropped with their reasons."""

    runs: pd.DataFrame
    dropped: pd.DataFrame


def shape_for(target_active: float, variant: Variant, sweep: SweepConfig) -> ModelConfig:
    """The model whose ACTIVE params are closest to ``target_active`` under the shape rules.

    Widths are multiples of the head size from ``min_d_model``. ``shape.rule = "aspect"`` (default): each
    width's depth follows the aspect ratio, n_layers = round(d_model / aspect_ratio) within [1, max_layers], so
    sizes grow in width and depth together (one family of shapes, as in Kaplan et al. and Chinchilla).
    ``"size"``: every depth up to max_layers is a candidate; among shapes within 10% of the best size match, the
    one closest to the aspect ratio wins (finer sizes, e.g. two depths at one width).
    """
    shape = sweep.shape
    candidates = []
    for d_model in range(max(shape.head_dim, shape.min_d_model), 64 * shape.head_dim + 1, shape.head_dim):
        aspect_depth = min(shape.max_layers, max(1, round(d_model / shape.aspect_ratio)))
        depths = [aspect_depth] if shape.rule == "aspect" else range(1, shape.max_layers + 1)
        sizes = []
        for n_layers in depths:
            cfg = model_config(d_model, n_layers, variant, sweep)
            if cfg is None:
                continue
            n = param_counts(cfg).active
            sizes.append(n)
            candidates.append((abs(math.log(n / target_active)),
                               abs(math.log(d_model / n_layers / shape.aspect_ratio)), cfg))
        if sizes and min(sizes) > 4 * target_active:
            break
    if not candidates:
        raise ConfigError(f"no model shape fits {target_active:.3g} active params")
    best = min(c[0] for c in candidates)
    near = [c for c in candidates if c[0] <= best + (0.1 if shape.rule == "size" else 0.0)]
    return min(near, key=lambda c: (c[1], c[0]))[2]


def model_config(d_model: int, n_layers: int, variant: Variant, sweep: SweepConfig) -> ModelConfig | None:
    d_ff = sweep.shape.ffn_mult * d_model
    granularity = int(sweep.model.get("granularity", 1)) if variant.n_experts > 1 else 1
    if d_ff % granularity:
        return None
    # a dense model has no router: its spec (and id) is the plain dense run's, shared by sweeps of any router
    ignored = ("granularity",) if variant.n_experts > 1 else ("granularity", "router")
    overrides = {k: v for k, v in sweep.model.items() if k not in ignored}
    return build(ModelConfig, {
        "vocab_size": sweep.vocab_size, "context": sweep.context, "d_model": d_model, "n_layers": n_layers,
        "n_heads": d_model // sweep.shape.head_dim, "d_ff": d_ff, "n_experts": variant.n_experts,
        "top_k": variant.top_k, "granularity": granularity, **overrides,
    }, "model")


BUDGET_TOLERANCE = 0.01  # a run's FLOPs lie within 1% of its budget
DUPLICATE_SHAPE = ("duplicate shape of a nearby size (the shape rules' head_dim, min_d_model or max_layers allow "
                   "no other)")


def target_sizes(budget: float, sweep: SweepConfig) -> np.ndarray:
    """Active-param targets log-spaced over ``span`` around the estimated optimum sqrt(C / (6·tokens_per_param))
    (Chinchilla's ~20 tokens/param) or around ``sizes.center`` x that estimate when given."""
    sizes = sweep.sizes
    center = math.sqrt(budget / (6 * sizes.tokens_per_param)) * (sizes.center or 1.0)
    if sizes.count == 1:
        return np.array([center])
    half = math.sqrt(sizes.span)
    return np.geomspace(center / half, center * half, sizes.count)


MAX_SIZES = 256  # sizes per budget and sparsity; more cannot be distinct shapes under any sane shape rules


def seeds_for(budget: float, sweep: SweepConfig) -> list[int]:
    """The seeds run at ``budget``: the sweep's, plus the repeat seeds at the repeat budgets (or at all)."""
    seeds = list(sweep.seeds)
    if any(math.isclose(budget, b, rel_tol=1e-9) for b in sweep.repeat_budgets) or (
        sweep.repeat_seeds and not sweep.repeat_budgets
    ):
        seeds += [s for s in sweep.repeat_seeds if s not in seeds]
    return seeds


def check_size(sweep: SweepConfig, max_runs: int | None) -> int:
    """The most runs the sweep can plan (before dropped points), counted without planning it; a ConfigError
    when that exceeds ``max_runs`` (None: no cap), so one typo cannot queue a million runs."""
    bounded_sizes(sweep)
    most = sum(len(seeds_for(b, sweep)) for b in sweep.budgets) * len(sweep.variants) * sweep.sizes.count
    if max_runs is not None and most > max_runs:
        raise ConfigError(f"{sweep.path or sweep.name}: up to {most:,} runs ({len(sweep.budgets)} budgets × "
                          f"{len(sweep.variants)} sparsities × {sweep.sizes.count} sizes × seeds), over the cap of "
                          f"{max_runs:,}: raise --max-runs or pass --force if you mean it")
    return most


def bounded_sizes(sweep: SweepConfig) -> None:
    """A ConfigError if ``sizes.count`` is over MAX_SIZES (a typo that would plan for hours)."""
    if sweep.sizes.count > MAX_SIZES:
        raise ConfigError(f"{sweep.path or sweep.name}: sizes.count = {sweep.sizes.count:,} is over the limit of "
                          f"{MAX_SIZES} sizes per budget and sparsity")


def plan(sweep: SweepConfig) -> Plan:
    """Enumerate every (budget, sparsity, size, U, seed) point, derive D and epochs, drop impossible points."""
    bounded_sizes(sweep)
    rows, dropped = [], []
    batch_tokens = sweep.train.batch_size * sweep.context
    for budget in sweep.budgets:
        seeds = seeds_for(budget, sweep)
        for variant in sweep.variants:
            shapes: dict = {}
            for target in (lattice_sizes if sweep.schedule.on_lattice else target_sizes)(budget, sweep):
                cfg = shape_for(target, variant, sweep)
                if cfg in shapes:
                    dropped.append({**describe(budget, variant, cfg, target), "reason": DUPLICATE_SHAPE})
                    continue
                shapes[cfg] = target
            for (cfg, target), unique in itertools.product(shapes.items(), sweep.unique_token_values):
                fpt = train_flops_per_token(cfg)
                steps = round(budget / (fpt * batch_tokens))
                tokens = steps * batch_tokens
                epochs = tokens / unique
                point = {**describe(budget, variant, cfg, target), "steps": steps, "epochs": epochs}
                if sweep.unique_token_levels:
                    point["unique_tokens"] = unique
                if steps and abs(fpt * tokens / budget - 1) > BUDGET_TOLERANCE:
                    dropped.append({**point, "reason": f"budget missed by more than {BUDGET_TOLERANCE:.0%} "
                                    "(too few steps to round to)"})
                    continue
                if steps < sweep.min_steps:
                    dropped.append({**point, "reason": f"fewer than min_steps={sweep.min_steps} steps"})
                    continue
                if epochs > sweep.max_epochs:
                    dropped.append({**point, "reason": f"more than max_epochs={sweep.max_epochs:g} epochs"})
                    continue
                train = with_lr(sweep.train, cfg.d_model, sweep.lr_ref_width)
                for seed in seeds:
                    spec = RunSpec(model=cfg, train=train, tokens=tokens, unique_tokens=unique,
                                   seed=seed, corpus=sweep.corpus, tokenizer=sweep.tokenizer)
                    rows.append(row_for(spec, budget))
    runs = pd.DataFrame(rows, columns=COLUMNS)
    if runs.empty:
        raise ConfigError(f"{sweep.path or sweep.name}: no run fits any budget "
                          f"({len(dropped)} points dropped: {summarize(dropped)})")
    runs = runs.drop_duplicates("run_id").reset_index(drop=True)
    return Plan(runs=branch_plan(runs, sweep) if sweep.schedule.branches else runs, dropped=pd.DataFrame(dropped))


def describe(budget: float, variant: Variant, cfg: ModelConfig, target: float) -> dict:
    """A grid point as the dropped-points table shows it."""
    return {"budget": budget, "sparsity": variant.sparsity, "n_experts": variant.n_experts, "top_k": variant.top_k,
            "d_model": cfg.d_model, "n_layers": cfg.n_layers, "target_active": target}


COLUMNS = ["run_id", "budget", "flops", "flops_6nd", "params", "active_params", "embedding_params",
           "sparsity", "param_sparsity", "n_experts", "top_k", "d_model", "n_layers", "n_heads", "lr", "steps",
           "tokens", "unique_tokens", "epochs", "seed", "threads", "role", "trunk_id", "flops_spent", "spec"]


def row_for(spec: RunSpec, budget: float) -> dict:
    """One planned run as a flat record: the columns researchers filter and fit on, plus the spec itself."""
    cfg = spec.model
    counts = param_counts(cfg)
    flops = train_flops_per_token(cfg) * spec.tokens
    return {
        "run_id": spec.run_id, "budget": budget, "flops": flops, "role": "run", "trunk_id": None, "flops_spent": flops,
        "flops_6nd": flops_6nd(cfg, spec.tokens), "params": counts.total, "active_params": counts.active,
        "embedding_params": counts.embedding, "sparsity": expert_sparsity(cfg),
        "param_sparsity": param_sparsity(cfg), "n_experts": cfg.n_experts, "top_k": cfg.top_k,
        "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "lr": spec.train.lr,
        "steps": spec.steps, "tokens": spec.tokens, "unique_tokens": spec.unique_tokens,
        "epochs": spec.tokens / spec.unique_tokens, "seed": spec.seed, "threads": spec.train.threads, "spec": spec,
    }


def summarize(dropped: list[dict] | pd.DataFrame) -> str:
    """'3 × reason, 1 × reason' for messages."""
    reasons = pd.Series([d["reason"] for d in (dropped.to_dict("records") if isinstance(dropped, pd.DataFrame)
                                               else dropped)], dtype=object)
    return ", ".join(f"{n} × {r}" for r, n in reasons.value_counts().items()) or "none"


def quick(sweep: SweepConfig, budgets: int = 2, variants: int = 2, sizes: int = 3,
          span: float | None = None) -> SweepConfig:
    """A reduced copy of a sweep (smallest budgets, dense + the sparsest variants, fewer sizes, over at most
    ``span`` when given; every U) for smoke tests."""
    keep = (sweep.variants[:1] + sweep.variants[1:][-(variants - 1):]) if variants > 1 else sweep.variants[:1]
    return replace(sweep, name=f"{sweep.name}-quick", budgets=sweep.budgets[:budgets], variants=keep,
                   sizes=replace(sweep.sizes, count=min(sizes, sweep.sizes.count),
                                 span=min(span or sweep.sizes.span, sweep.sizes.span)), repeat_seeds=(),
                   repeat_budgets=())
