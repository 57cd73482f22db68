"""Training throughput of a sweep's model shapes at one thread, as sweep workers run them, and the sweep it buys.

Family: every distinct model shape of the sweep's plan (default the demo: each size, dense and every sparsity)
trains on fixed random tokens at its batch size with ``torch.set_num_threads(1)``. Achieved GFLOP/s are the
exact training FLOPs of the steps (``flops.train_flops_per_token``) over their time, and each is divided by the
float32 single-thread matmul peak measured in the same repeat. Attention runs on the path the model picks
(``auto``: ``model.batched_attention_wins``) and, as the comparison, forced onto SDPA (``sdpa``); the family
summary averages the shapes of ``--family-experts`` (default: every sparsity of the sweep).

Ceiling: what bounds the smallest shapes. For each shape, the output layer and cross-entropy alone (forward and
backward of ``F.cross_entropy(F.linear(h, W))`` at its width and the 256-way byte vocabulary, timed in the same
repeats): the fraction of peak a step would reach if everything else took no time.

Start-up: seconds from starting a worker to its exit for a task that builds a model and its optimizer, as a fresh
interpreter (``process.start_worker``, the Ray backend's) and forked from the template process
(``process.fork_worker``, the local backend's), interleaved.

Grid: isoFLOP points per CPU-minute over the whole plan, each run's own FLOPs divided by its shape's measured
throughput plus one forked start-up per run (evaluation not included), as planned (dedicated runs) and with trunks
and cooldown branches (``[schedule] kind = "wsd-branches"``: ``branches.trained_flops`` per run, and the FLOPs
spent over the FLOPs the points represent).

The machine may be shared, so every figure is the median of interleaved repeats and ratios pair figures measured
moments apart; ``--clock cpu`` times this thread's CPU time instead of wall time, which a busy machine inflates.

    python benchmarks/sweep_throughput.py [--sweep sweeps/demo.toml] [--repeats 5] [--steps 5] [--clock wall|cpu]
                                          [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from train_throughput import Bench, matmul_gflops

from scaling.branches import trained_flops
from scaling.config import ModelConfig, SweepConfig, TrainConfig, load_sweep
from scaling.executors.base import Task
from scaling.executors.process import collect, fork_worker, pickle_task, start_worker
from scaling.flops import train_flops_per_token
from scaling.grid import plan
from scaling.model import Attention, batched_attention_wins
from scaling.train import keep_freed_memory

PATHS = ("auto", "sdpa")
TARGET = 0.30  # the fraction of peak the throughput issue asks of the family on average
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
DEMO = Path(__file__).resolve().parent.parent / "sweeps" / "demo.toml"


def force_sdpa(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.batched = False


def grid_rate(runs: pd.DataFrame, work: pd.Series, gflops: dict[ModelConfig, float], start_s: float) -> dict:
    """CPU-minutes of training steps for ``work`` (FLOPs each planned run trains itself) at each shape's
    throughput, plus ``start_s`` per run, and isoFLOP points (runs that are not trunks) per CPU-minute."""
    steps = sum(f / (gflops[spec.model] * 1e9) for f, spec in zip(work, runs["spec"], strict=True))
    seconds = steps + start_s * len(runs)
    points = int((runs["role"] != "trunk").sum()) if "role" in runs else len(runs)
    return {"flops": float(work.sum()), "cpu_minutes": seconds / 60, "steps_cpu_minutes": steps / 60,
            "points_per_cpu_minute": points * 60 / seconds}


class Head:
    """A shape's output layer and cross-entropy, forward and backward, on random activations."""

    def __init__(self, cfg: ModelConfig, batch: int) -> None:
        self.h = torch.randn(batch * cfg.context, cfg.d_model, requires_grad=True)
        self.w = (0.02 * torch.randn(cfg.vocab_size, cfg.d_model)).requires_grad_()
        self.y = torch.randint(0, cfg.vocab_size, (batch * cfg.context,))

    def seconds_per_step(self, steps: int, clock: Callable[[], float] = time.perf_counter) -> float:
        start = clock()
        for _ in range(steps):
            self.h.grad = self.w.grad = None
            F.cross_entropy(F.linear(self.h, self.w), self.y).backward()
        return (clock() - start) / steps


def build(spec: dict, run_dir: str) -> dict:
    """The start-up task: what a worker does before its first step (model, optimizer), nothing more."""
    from scaling.model import Transformer
    from scaling.train import make_optimizer

    make_optimizer(Transformer(ModelConfig(**spec)), TrainConfig())
    return {}


def startup_seconds(cfg: ModelConfig, start: Callable, tick: Callable[[], float]) -> float:
    """Seconds from starting a worker with ``start`` (``start_worker`` or ``fork_worker``) to its outcome."""
    with tempfile.TemporaryDirectory() as tmp:
        task = Task("startup", asdict(cfg), tmp)
        payload = Path(tmp) / "task.pkl"
        payload.write_bytes(pickle_task(build, task))
        begin = tick()
        worker = start(payload, task, 1)
        while (code := worker.poll()) is None:
            time.sleep(0.005)
        result, error = collect(payload, task, code, cancelled=False)
        if error:
            raise RuntimeError(error)
        return tick() - begin


def branched(sweep: SweepConfig) -> pd.DataFrame:
    """The sweep's plan with trunks and cooldown branches (``[schedule] kind = "wsd-branches"``): the one place
    branch accounting enters this benchmark."""
    return plan(replace(sweep, schedule=replace(sweep.schedule, kind="wsd-branches"))).runs


def dedicated(sweep: SweepConfig) -> pd.DataFrame:
    """The sweep's points as dedicated runs; for a branching sweep the same points (its lattice sizes)."""
    schedule = replace(sweep.schedule, kind="dedicated", lattice=sweep.schedule.on_lattice)
    return plan(replace(sweep, schedule=schedule)).runs


def measure(sweep: SweepConfig, repeats: int, steps: int, clock: str, family_experts: tuple[int, ...]) -> dict:
    """Medians over interleaved repeats of peak and step throughput per shape and attention path."""
    torch.set_num_threads(1)
    keep_freed_memory()  # as train_run does on CPU
    runs, branches = dedicated(sweep), branched(sweep)
    shapes = sorted(set(runs["spec"].map(lambda spec: spec.model)) | set(branches["spec"].map(lambda s: s.model)),
                    key=lambda c: (c.n_experts, c.d_model, c.n_layers))
    family_experts = family_experts or tuple(sorted({cfg.n_experts for cfg in shapes}))
    batch = sweep.train.batch_size
    benches = {(cfg, path): Bench(cfg, batch) for cfg in shapes for path in PATHS}
    heads = {(cfg, "head"): Head(cfg, batch) for cfg in shapes}
    for (_, path), bench in benches.items():
        if path == "sdpa":
            force_sdpa(bench.model)
        bench.seconds_per_step(2)  # warm-up
    tick = CLOCKS[clock]
    starters = {"fresh": start_worker, "forked": fork_worker}
    starts: dict[str, list[float]] = {name: [] for name in starters}
    startup_seconds(shapes[0], fork_worker, time.perf_counter)  # starts the template
    peaks: list[float] = []
    seconds: dict[tuple, list[float]] = {key: [] for key in [*benches, *heads]}
    fraction: dict[tuple, list[float]] = {key: [] for key in [*benches, *heads]}
    for _ in range(repeats):
        peaks.append(matmul_gflops(clock=tick))
        for (cfg, path), bench in [*benches.items(), *heads.items()]:
            s = bench.seconds_per_step(steps, tick)
            seconds[cfg, path].append(s)
            fraction[cfg, path].append(train_flops_per_token(cfg) * batch * cfg.context / s / 1e9 / peaks[-1])
        for name, start in starters.items():  # wall clock: a worker is another process
            starts[name].append(startup_seconds(shapes[-1], start, time.perf_counter))
    peak = statistics.median(peaks)
    start_s = {name: statistics.median(s) for name, s in starts.items()}
    gflops = {path: {cfg: train_flops_per_token(cfg) * batch * cfg.context / statistics.median(seconds[cfg, path])
                     / 1e9 for cfg in shapes} for path in PATHS}
    rows = [{"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_experts": cfg.n_experts, "top_k": cfg.top_k,
             "head_dim": cfg.head_dim,
             "batched_attention": batched_attention_wins(cfg.context, cfg.head_dim, cfg.n_heads),
             "gflops": {path: gflops[path][cfg] for path in PATHS},
             "peak_fraction": {path: statistics.median(fraction[cfg, path]) for path in PATHS},
             "head_ceiling": statistics.median(fraction[cfg, "head"]),
             "speedup": statistics.median(s / a for s, a in zip(seconds[cfg, "sdpa"], seconds[cfg, "auto"],
                                                                   strict=True))}
            for cfg in shapes]
    family = [r for r in rows if r["n_experts"] in family_experts]
    points = branches[branches["role"] != "trunk"]
    return {
        "sweep": sweep.name, "clock": clock, "threads": torch.get_num_threads(), "batch_size": batch,
        "peak_gflops": peak, "shapes": rows,
        "family": {"experts": list(family_experts), "shapes": len(family),
                   "mean_peak_fraction": {path: statistics.mean(r["peak_fraction"][path] for r in family)
                                          for path in PATHS},
                   "capped": [{"d_model": r["d_model"], "n_experts": r["n_experts"], "head_ceiling": r["head_ceiling"]}
                              for r in family if r["head_ceiling"] < TARGET],
                   "mean_gflops": {path: statistics.mean(r["gflops"][path] for r in family) for path in PATHS}},
        "startup_s": start_s,
        "grid": {"points": len(runs), "flops_planned": float(runs["flops"].sum()),
                 "without_branches": {path: grid_rate(runs, runs["flops"], gflops[path], start_s["forked"])
                                      for path in PATHS},
                 "with_branches": {"points": len(points), "trunks": int((branches["role"] == "trunk").sum()),
                                   "spent_over_represented": float(branches["flops_spent"].sum()
                                                                   / points["flops"].sum()),
                                   **{path: grid_rate(branches, trained_flops(branches), gflops[path],
                                                      start_s["forked"]) for path in PATHS}}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=str(DEMO), help="sweep TOML whose plan gives the shapes (the demo)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (the median is reported)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per repeat, shape and path")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this thread's CPU time (steadier on a busy machine)")
    parser.add_argument("--family-experts", default="", help="expert counts the family summary averages, e.g. "
                        "1,8 (default: every sparsity of the sweep)")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    args = parser.parse_args()
    experts = tuple(int(e) for e in args.family_experts.split(",") if e)
    r = measure(load_sweep(args.sweep), args.repeats, args.steps, args.clock, experts)
    if args.json:
        json.dump(r, sys.stdout)
        print()
        return
    print(f"float32 matmul peak (2048², 1 thread, {r['clock']} clock): {r['peak_gflops']:.0f} GFLOP/s")
    print(f"{'d':>3} {'L':>2} {'E':>2} {'hd':>3} {'path':>7} {'GFLOP/s':>8} {'peak':>5} {'sdpa':>8} {'peak':>5} "
          f"{'speedup':>7} {'ceiling':>7}")
    for s in r["shapes"]:
        path = "batched" if s["batched_attention"] else "sdpa"
        print(f"{s['d_model']:>3} {s['n_layers']:>2} {s['n_experts']:>2} {s['head_dim']:>3} {path:>7} "
              f"{s['gflops']['auto']:>8.1f} {s['peak_fraction']['auto']:>5.0%} {s['gflops']['sdpa']:>8.1f} "
              f"{s['peak_fraction']['sdpa']:>5.0%} {s['speedup']:>6.2f}x {s['head_ceiling']:>7.0%}")
    fam = r["family"]
    print(f"family (E in {fam['experts']}, {fam['shapes']} shapes): mean {fam['mean_peak_fraction']['auto']:.0%} of "
          f"peak ({fam['mean_peak_fraction']['sdpa']:.0%} with SDPA attention)")
    if fam["capped"]:
        widths = sorted({c["d_model"] for c in fam["capped"]})
        ceilings = [c["head_ceiling"] for c in fam["capped"]]
        print(f"the output layer and cross-entropy alone cap {len(fam['capped'])} of them below {TARGET:.0%} "
              f"(d_model {', '.join(map(str, widths))}: at most {min(ceilings):.0%}-{max(ceilings):.0%} of peak "
              f"if the rest of the step took no time; ceiling column)")
    print(f"worker start-up: {r['startup_s']['fresh']:.2f} s as a fresh interpreter, {r['startup_s']['forked']:.2f} s "
          f"forked from the template ({r['startup_s']['fresh'] / r['startup_s']['forked']:.0f}x)")
    grid = r["grid"]
    for name in ("without_branches", "with_branches"):
        g = grid[name]
        print(f"grid {name.replace('_', ' ')}: {g.get('points', grid['points'])} points, "
              f"{g['auto']['flops']:.3g} FLOPs trained, {g['auto']['cpu_minutes']:.1f} CPU-min "
              f"({g['auto']['steps_cpu_minutes']:.1f} of steps; {g['sdpa']['cpu_minutes']:.1f} with SDPA), "
              f"{g['auto']['points_per_cpu_minute']:.2f} points per CPU-min")
    print(f"branches: {grid['with_branches']['trunks']} trunks; FLOPs spent / represented = "
          f"{grid['with_branches']['spent_over_represented']:.0%}")

if __name__ == "__main__":
    main()
