"""Typed configuration: model, training and sweep settings, TOML loading with one clear error per problem."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib


class ConfigError(ValueError):
    """A sweep or run configuration problem, phrased for the user (file, key, problem)."""


# model.router: name -> its class in ``scaling.router`` (looked up only to build a model, so that planning never
# imports torch). The first is the default. Adding a router: its class there and its line here.
ROUTERS = {
    "softmax-topk": "SoftmaxTopK",
    "sigmoid-topk": "SigmoidTopK",
}


@dataclass(frozen=True)
class ModelConfig:
    """One transformer. Dense is ``n_experts == 1``; MoE layers replace the FFN every ``moe_every``-th layer.

    ``d_ff`` is the dense FFN width; an expert has width ``d_ff // granularity`` (Krajewski et al. 2024).
    ``capacity_factor == 0`` means dropless dispatch. ``router`` names a router of ``ROUTERS``.
    """

    vocab_size: int = 256
    context: int = 128
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int = 256
    n_experts: int = 1
    top_k: int = 1
    granularity: int = 1
    moe_every: int = 1
    shared_experts: int = 0
    share_weights: bool = False
    positional: str = "learned"
    tie_embeddings: bool = True
    router: str = next(iter(ROUTERS))
    router_noise: bool = False
    capacity_factor: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "d_model", "n_layers", "n_heads", "d_ff", "n_experts",
                     "top_k", "granularity", "moe_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"model.top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.d_ff % self.granularity:
            raise ConfigError(f"model.d_ff={self.d_ff} is not divisible by granularity={self.granularity}")
        if self.positional not in ("learned", "rotary"):
            raise ConfigError(f"model.positional must be 'learned' or 'rotary', got {self.positional!r}")
        if self.router not in ROUTERS:
            raise ConfigError(f"model.router must be one of {', '.join(ROUTERS)}, got {self.router!r}"
                              f"{suggest(self.router, list(ROUTERS))}")
        if self.capacity_factor < 0 or self.shared_experts < 0:
            raise ConfigError("model.capacity_factor and model.shared_experts must be >= 0")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    @property
    def d_expert(self) -> int:
        return self.d_ff // self.granularity

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Layer ``layer`` (0-based) has an MoE FFN: every ``moe_every``-th layer, counting from 1."""
        return self.is_moe and (layer + 1) % self.moe_every == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))


DECAY_SHAPES = ("linear", "sqrt")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and evaluation settings of one run (Porian et al. 2024 recipe by default)."""

    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_frac: float = 0.05
    schedule: str = "cosine"
    decay_frac: float = 0.2
    batch_size: int = 32
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_tokens: int = 32768
    token_loss_tokens: int = 4096
    checkpoints_per_octave: int = 1
    first_checkpoint_step: int = 16
    log_every: int = 10
    save_every: int = 200
    threads: int = 1  # CPU threads of the run: part of its spec, since losses depend on it
    warmup_steps: int = 0  # > 0: warmup in steps, overriding warmup_frac (trunks and their branches share it)
    decay_shape: str = "linear"  # the wsd cooldown: "linear" or "sqrt" (1 - sqrt, Hägele et al. 2024)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"train.schedule must be cosine, wsd or constant, got {self.schedule!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ConfigError(f"train.decay_shape must be one of {', '.join(DECAY_SHAPES)}, got {self.decay_shape!r}")
        for name in ("lr", "batch_size", "eval_tokens", "token_loss_tokens", "checkpoints_per_octave",
                     "first_checkpoint_step", "log_every", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.min_lr_frac <= 1 or not 0 < self.decay_frac <= 1:
            raise ConfigError("train.warmup_frac, min_lr_frac and decay_frac must be fractions in [0, 1]")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ConfigError(f"train.beta1 and beta2 must lie in [0, 1), got {self.beta1}, {self.beta2}")
        for name in ("weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.threads < 1:
            raise ConfigError(f"train.threads must be at least 1 (a run's thread count is part of its spec), got "
                              f"{self.threads}")
        if self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip must be positive, got {self.grad_clip}")


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one training run; ``run_id`` hashes its normalised form."""

    model: ModelConfig
    train: TrainConfig
    tokens: int
    unique_tokens: int
    seed: int = 0
    corpus: str = "shakespeare"
    tokenizer: str = "byte"
    trunk: str = ""  # a branch: the run_id of the trunk it starts from, at cooldown_start
    branch_steps: tuple[int, ...] = ()  # a trunk: the steps whose checkpoints its branches start from (kept)

    def __post_init__(self) -> None:
        steps = self.branch_steps
        if not isinstance(steps, (list, tuple)) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in steps):
            raise ConfigError(f"run.branch_steps must be a list of positive step numbers, got {steps!r}")
        object.__setattr__(self, "branch_steps", tuple(sorted(set(steps))))  # JSON gives a list
        if self.trunk and self.steps and not 0 < self.cooldown_start < self.steps:
            raise ConfigError(f"run.trunk: a branch needs a cooldown inside its {self.steps} steps")

    @property
    def cooldown_start(self) -> int:
        """The first step of the wsd cooldown: ``steps - round(decay_frac · steps)`` (after the warmup)."""
        return cooldown_start(self.train, self.steps)

    @property
    def steps(self) -> int:
        return self.tokens // (self.train.batch_size * self.model.context)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON has it (``branch_steps`` a list)."""
        return {**asdict(self), "branch_steps": list(self.branch_steps)}

    def canonical(self) -> dict[str, Any]:
        """The form ``run_id`` hashes: every field of spec version 1, plus a later field only where it differs from
        its default, plus ``spec_version`` only above 1. So adding an option with a default keeps every stored id,
        and a change of what an existing field means bumps ``SPEC_VERSION`` (new ids, by design)."""
        return canonical_spec(self)

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        d = dict(d)
        model = build(ModelConfig, d.pop("model", {}), "model")
        train = build(TrainConfig, d.pop("train", {}), "train")
        return build(cls, {**d, "model": model, "train": train}, "run")


# The spec's fields when ids were first hashed (spec version 1). These are always part of the hash; a field added
# since is hashed only when it differs from its default. Never add a name here: that would change stored ids.
SPEC_VERSION = 1
V1_FIELDS = {
    "run": {"model", "train", "tokens", "unique_tokens", "seed", "corpus", "tokenizer"},
    "model": {"vocab_size", "context", "d_model", "n_layers", "n_heads", "d_ff", "n_experts", "top_k", "granularity",
              "moe_every", "shared_experts", "share_weights", "positional", "tie_embeddings", "router_noise",
              "capacity_factor", "aux_loss_coef", "z_loss_coef"},
    "train": {"lr", "min_lr_frac", "warmup_frac", "schedule", "decay_frac", "batch_size", "weight_decay", "beta1",
              "beta2", "grad_clip", "eval_tokens", "token_loss_tokens", "checkpoints_per_octave",
              "first_checkpoint_step", "log_every", "save_every", "threads"},
}


# Spec version 1 wrote train.threads = 0 ("cores / workers, decided at run time"): ids did not say how many threads
# a run used, though its losses depend on it. Now the count is part of the spec (at least 1) and one thread hashes
# as version 1's 0, so that runs trained with one thread keep their ids; the store's migration (``store.
# resolve_threads``) re-keys the stored runs that ran with more, so that no stored id is ambiguous.
V1_ONE_THREAD = 0


def canonical_spec(spec: RunSpec) -> dict[str, Any]:
    """``spec.to_dict()`` without the fields added after spec version 1 that sit at their defaults (and one
    thread written as version 1 wrote it, ``V1_ONE_THREAD``)."""

    def trim(obj: Any, section: str) -> dict[str, Any]:
        return {f.name: getattr(obj, f.name) for f in fields(obj)
                if f.name in V1_FIELDS[section] or getattr(obj, f.name) != f.default}

    train = trim(spec.train, "train")
    if train["threads"] == 1:
        train["threads"] = V1_ONE_THREAD
    out = {**trim(spec, "run"), "model": trim(spec.model, "model"), "train": train}
    if SPEC_VERSION > 1:
        out["spec_version"] = SPEC_VERSION
    return out


def warmup_steps(train: TrainConfig, total: int) -> int:
    """Warmup length of a ``total``-step run: ``warmup_steps`` when set, else ``warmup_frac`` of the run."""
    return train.warmup_steps or round(train.warmup_frac * total)


def cooldown_start(train: TrainConfig, total: int) -> int:
    """First step of the wsd cooldown of a ``total``-step run: the last ``decay_frac`` of it, after the warmup."""
    return max(warmup_steps(train, total), total - round(train.decay_frac * total))


def suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(section: dict[str, Any], known: list[str], where: str) -> None:
    for key in section:
        if key not in known:
            raise ConfigError(f"unknown key {where}.{key}{suggest(key, known)}".replace(" .", " "))


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a config dataclass from a dict, rejecting unknown keys and wrong types."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    check_keys(values, list(known), where)
    for key, value in values.items():
        default = known[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{key} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{where}.{key} must be a finite number, got {value!r}")
            if isinstance(default, int) and not float(value).is_integer():
                raise ConfigError(f"{where}.{key} must be an integer, got {value!r}")
            values = {**values, key: type(default)(value)}
        if isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{where}.{key} must be a string, got {value!r}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class Variant:
    """One sparsity level: ``n_experts`` experts with ``top_k`` active (dense: 1, 1)."""

    n_experts: int
    top_k: int

    @property
    def sparsity(self) -> float:
        """Expert sparsity S = (E - k) / E (Abnar et al. 2025)."""
        return (self.n_experts - self.top_k) / self.n_experts


@dataclass(frozen=True)
class Sizes:
    count: int = 5
    span: float = 8.0
    tokens_per_param: float = 20.0
    center: float = 0.0

    def __post_init__(self) -> None:
        if self.count < 1 or self.span < 1 or self.tokens_per_param <= 0 or self.center < 0:
            raise ConfigError(f"sizes: count must be >= 1, span >= 1, tokens_per_param > 0 and center >= 0 "
                              f"(0: from tokens_per_param), got count={self.count}, span={self.span}, "
                              f"tokens_per_param={self.tokens_per_param}, center={self.center}")


@dataclass(frozen=True)
class Shape:
    aspect_ratio: float = 32.0
    head_dim: int = 16
    ffn_mult: int = 4
    max_layers: int = 24
    min_d_model: int = 32
    rule: str = "aspect"  # depth from the aspect ratio ("aspect"), or any depth, closest size first ("size")

    def __post_init__(self) -> None:
        if self.rule not in ("aspect", "size"):
            raise ConfigError(f"shape.rule must be 'aspect' or 'size', got {self.rule!r}")
        for name in ("aspect_ratio", "head_dim", "ffn_mult", "max_layers", "min_d_model"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"shape.{name} must be positive, got {getattr(self, name)}")


SCHEDULE_KINDS = ("dedicated", "wsd-branches")


@dataclass(frozen=True)
class Schedule:
    """How a sweep trains its points. ``dedicated``: each point is its own run with ``train.schedule``.
    ``wsd-branches``: one constant-LR trunk per (shape, sparsity, seed, U) and, per point of D tokens, a branch
    from the trunk's checkpoint at D - L_c that cools down over the last ``cooldown`` fraction of D with the
    ``decay_shape`` shape (Hägele et al. 2024, arXiv 2405.18392). ``lattice``: size lists on one log lattice
    across budgets (``scaling.branches.lattice_sizes``), always so with branches."""

    kind: str = "dedicated"
    cooldown: float = 0.2
    decay_shape: str = "sqrt"
    lattice: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"schedule.kind must be one of {', '.join(SCHEDULE_KINDS)}, got {self.kind!r}")
        if not 0 < self.cooldown < 1:
            raise ConfigError(f"schedule.cooldown must be a fraction in (0, 1), got {self.cooldown!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ConfigError(f"schedule.decay_shape must be one of {', '.join(DECAY_SHAPES)}, "
                              f"got {self.decay_shape!r}")

    @property
    def branches(self) -> bool:
        return self.kind == "wsd-branches"

    @property
    def on_lattice(self) -> bool:
        return self.lattice or self.branches


@dataclass(frozen=True)
class SweepConfig:
    """A sweep file: budgets x sparsities x active-parameter sizes under a unique-token limit U.

    ``unique_tokens = [U1, U2]`` sweeps U as well: ``unique_tokens`` is then the largest and
    ``unique_token_levels`` all of them (ascending); with one U, ``unique_token_levels`` is empty.
    """

    name: str
    budgets: tuple[float, ...]
    variants: tuple[Variant, ...]
    unique_tokens: int
    corpus: str = "shakespeare"
    tokenizer: str = "byte"
    vocab_size: int = 256
    context: int = 128
    max_epochs: float = 100.0
    min_steps: int = 100
    seeds: tuple[int, ...] = (0,)
    repeat_seeds: tuple[int, ...] = ()
    repeat_budgets: tuple[float, ...] = ()
    sizes: Sizes = field(default_factory=Sizes)
    shape: Shape = field(default_factory=Shape)
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: Schedule = field(default_factory=Schedule)
    lr_ref_width: int = 0
    executor: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    unique_token_levels: tuple[int, ...] = ()

    @property
    def unique_token_values(self) -> tuple[int, ...]:
        """Every unique-token limit U the sweep plans, ascending."""
        return self.unique_token_levels or (self.unique_tokens,)


TOP_KEYS = ["name", "corpus", "tokenizer", "vocab_size", "context", "unique_tokens", "budgets", "max_epochs",
            "min_steps", "seeds", "sparsity", "sizes", "shape", "model", "train", "repeat", "executor", "schedule"]
MODEL_OVERRIDES = ["granularity", "moe_every", "shared_experts", "share_weights", "positional", "tie_embeddings",
                   "router", "router_noise", "capacity_factor", "aux_loss_coef", "z_loss_coef"]
EXECUTOR_KEYS = ["partition", "time_min", "cpus_per_task", "gpus_per_node", "mem_gb", "max_parallel"]


def positive(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a positive number, got {value!r}")
    return value


def whole(value: Any, key: str) -> int:
    """A positive whole number (``8`` or ``8.0``, not ``2.5``)."""
    if not float(positive(value, key)).is_integer():
        raise ConfigError(f"{key} must be a whole number, got {value!r}")
    return int(value)


def table(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a table ([{key}]), got {value!r}")
    return value


def number_list(value: Any, key: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} must be a non-empty list of numbers, got {value!r}")
    return tuple(positive(v, f"{key}[{i}]") for i, v in enumerate(value))


def parse_variants(section: Any) -> tuple[Variant, ...]:
    """``[sparsity]`` as ``experts = [1, 8]`` (+ ``top_k``) or ``levels = [0, 0.875]`` with a fixed ``top_k``."""
    if not isinstance(section, dict):
        raise ConfigError("sparsity must be a table with 'experts' or 'levels' (and 'top_k')")
    check_keys(section, ["experts", "levels", "top_k"], "sparsity")
    top_k = section.get("top_k", 1)
    if "experts" in section and "levels" in section:
        raise ConfigError("sparsity: give either 'experts' or 'levels', not both")
    for key in ("experts", "levels"):
        if key in section and (not isinstance(section[key], list) or not section[key]):
            raise ConfigError(f"sparsity.{key} must be a non-empty list, got {section[key]!r}")
    if "experts" in section:
        experts = [whole(e, "sparsity.experts") for e in section["experts"]]
    elif "levels" in section:
        experts = []
        for s in section["levels"]:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
                raise ConfigError(f"sparsity.levels must lie in [0, 1), got {s!r}")
            k = top_k if isinstance(top_k, int) else 1
            e = k / (1 - s)
            if abs(e - round(e)) > 1e-6:
                raise ConfigError(f"sparsity level {s} with top_k={k} needs a whole number of experts, got {e:g}")
            experts.append(round(e))
    else:
        raise ConfigError("sparsity needs 'experts' (list) or 'levels' (list of S in [0, 1))")
    ks = top_k if isinstance(top_k, list) else [top_k] * len(experts)
    if len(ks) != len(experts):
        raise ConfigError("sparsity.top_k as a list must have one entry per expert count")
    variants = []
    for e, k in zip(experts, ks, strict=True):
        k = whole(k, "sparsity.top_k")
        if e == 1:
            k = 1
        if k > e:
            raise ConfigError(f"sparsity: top_k={k} exceeds experts={e}")
        variants.append(Variant(e, k))
    return tuple(dict.fromkeys(variants))


def unique_token_list(value: Any) -> tuple[int, ...]:
    """``unique_tokens``: one whole number, or a list of 2+ distinct ones (U as a swept axis), ascending."""
    if not isinstance(value, list):
        return (int(positive(value, "unique_tokens")),)
    if len(value) < 2:
        raise ConfigError(f"unique_tokens as a list needs 2 or more values (or give one number), got {value!r}")
    levels = tuple(sorted(whole(v, f"unique_tokens[{i}]") for i, v in enumerate(value)))
    if len(set(levels)) < len(levels):
        raise ConfigError(f"unique_tokens lists a value twice: {value!r}")
    return levels


def seed_list(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise ConfigError(f"{key} must be a non-empty list of non-negative integers, got {value!r}")
    return tuple(value)


def parse_sweep(raw: dict[str, Any], path: str = "") -> SweepConfig:
    """Validate a parsed TOML sweep; every problem is one ConfigError naming the key."""
    check_keys(raw, TOP_KEYS, "")
    for key in ("name", "budgets", "unique_tokens", "sparsity"):
        if key not in raw:
            raise ConfigError(f"missing required key {key!r}")
    name = raw["name"]
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"name must be a plain identifier (letters, digits, - and _), got {name!r}")
    sizes_raw, shape_raw, model_raw = table(raw, "sizes"), table(raw, "shape"), table(raw, "model")
    check_keys(model_raw, MODEL_OVERRIDES, "model")
    build(ModelConfig, {k: v for k, v in model_raw.items()}, "model")
    train_raw = dict(table(raw, "train"))
    lr_ref = train_raw.pop("lr_ref_width", 0)
    if isinstance(lr_ref, bool) or not isinstance(lr_ref, int) or lr_ref < 0:
        raise ConfigError(f"train.lr_ref_width must be a whole number of channels >= 0 (0: off), got {lr_ref!r}")
    repeat = table(raw, "repeat")
    check_keys(repeat, ["seeds", "budgets"], "repeat")
    executor = table(raw, "executor")
    check_keys(executor, EXECUTOR_KEYS, "executor")
    for key, value in executor.items():
        if key == "partition" and not isinstance(value, str):
            raise ConfigError(f"executor.partition must be a string, got {value!r}")
        if key == "mem_gb":
            positive(value, "executor.mem_gb")
        elif key == "gpus_per_node":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"executor.gpus_per_node must be a whole number >= 0, got {value!r}")
        elif key != "partition":
            whole(value, f"executor.{key}")
    seeds = seed_list(raw.get("seeds", [0]), "seeds")
    unique = unique_token_list(raw["unique_tokens"])
    repeat_seeds = seed_list(repeat["seeds"], "repeat.seeds") if "seeds" in repeat else ()
    if not isinstance(raw.get("corpus", ""), str):
        raise ConfigError(f"corpus must be a name or a path (a string), got {raw['corpus']!r}")
    tokenizer = raw.get("tokenizer", "byte")
    if tokenizer not in ("byte", "bpe"):
        raise ConfigError(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}")
    vocab = int(positive(raw.get("vocab_size", 256), "vocab_size"))
    if tokenizer == "byte" and vocab != 256:
        raise ConfigError("vocab_size must be 256 with the byte tokenizer")
    return SweepConfig(
        name=name,
        budgets=tuple(sorted(number_list(raw["budgets"], "budgets"))),
        variants=parse_variants(raw["sparsity"]),
        unique_tokens=unique[-1],
        corpus=str(raw.get("corpus", "shakespeare")),
        tokenizer=tokenizer,
        vocab_size=vocab,
        context=int(positive(raw.get("context", 128), "context")),
        max_epochs=float(positive(raw.get("max_epochs", 100.0), "max_epochs")),
        min_steps=int(positive(raw.get("min_steps", 100), "min_steps")),
        seeds=seeds,
        repeat_seeds=repeat_seeds,
        repeat_budgets=tuple(number_list(repeat["budgets"], "repeat.budgets")) if "budgets" in repeat else (),
        sizes=build(Sizes, sizes_raw, "sizes"),
        shape=build(Shape, shape_raw, "shape"),
        model=dict(model_raw),
        train=build(TrainConfig, train_raw, "train"),
        schedule=build(Schedule, table(raw, "schedule"), "schedule"),
        lr_ref_width=lr_ref,
        executor=dict(executor),
        path=path,
        unique_token_levels=unique if len(unique) > 1 else (),
    )


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep TOML file; errors name the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a sweep file (a .toml)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a sweep file is TOML text)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    try:
        sweep = parse_sweep(raw, str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return sweep


def with_lr(train: TrainConfig, d_model: int, ref_width: int) -> TrainConfig:
    """Learning rate that shrinks with width: lr * ref_width / d_model (muP-style heuristic), if ref_width set."""
    if not ref_width:
        return train
    return replace(train, lr=train.lr * ref_width / d_model)
