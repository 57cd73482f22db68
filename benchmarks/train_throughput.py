"""Training throughput of the shared trainer's step on this machine: MFU of dense models and the MoE cost.

Measures the float32 matmul peak (2048² matmuls), then the exact training step of ``scaling.train``
(forward, backward, clipping, fused AdamW) for dense d_model 128 and 256 (4 layers, head size 16, context 128,
batch 32 sequences) and for 8-expert top-1 (granularity 1) and top-2 (granularity 2) MoE models with the same
active parameters as dense d128. Achieved FLOP/s use the exact count of ``flops.train_flops_per_token``.
The VM loses time to its host at random, so every figure is the median of interleaved repeats.

    python benchmarks/train_throughput.py [--repeats 7] [--steps 3] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from scaling.config import ModelConfig, TrainConfig
from scaling.flops import param_counts, train_flops_per_token
from scaling.model import Transformer
from scaling.train import keep_freed_memory, make_optimizer, train_step

CONTEXT, BATCH = 128, 32
SHAPE = dict(vocab_size=256, context=CONTEXT, n_layers=4)
MODELS = {
    "d128": ModelConfig(**SHAPE, d_model=128, n_heads=8, d_ff=512),
    "k1": ModelConfig(**SHAPE, d_model=128, n_heads=8, d_ff=512, n_experts=8, top_k=1),
    "k2": ModelConfig(**SHAPE, d_model=128, n_heads=8, d_ff=512, n_experts=8, top_k=2, granularity=2),
    "d256": ModelConfig(**SHAPE, d_model=256, n_heads=16, d_ff=1024),
}  # measured in this order, so each MoE step time sits next to the dense one it is compared with


def matmul_gflops(n: int = 2048, reps: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=out)
    start = clock()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    return 2 * n**3 * reps / (clock() - start) / 1e9


class Bench:
    """One model's training step on fixed random tokens."""

    def __init__(self, cfg: ModelConfig, batch: int = BATCH) -> None:
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = Transformer(cfg)
        self.opt = make_optimizer(self.model, TrainConfig(lr=1e-3))
        self.x = torch.randint(0, cfg.vocab_size, (batch, cfg.context))
        self.y = torch.randint(0, cfg.vocab_size, (batch, cfg.context))

    def seconds_per_step(self, steps: int, clock: Callable[[], float] = time.perf_counter) -> float:
        start = clock()
        for _ in range(steps):
            train_step(self.model, self.opt, self.x, self.y, 1.0, contextlib.nullcontext())
        return (clock() - start) / steps


def measure(repeats: int, steps: int, threads: int) -> dict:
    """Medians over interleaved repeats; MFU and MoE/dense ratios pair figures measured moments apart."""
    torch.set_num_threads(threads)
    keep_freed_memory()  # as train_run does on CPU
    benches = {name: Bench(cfg) for name, cfg in MODELS.items()}
    for bench in benches.values():
        bench.seconds_per_step(2)  # warm-up
    tokens = BATCH * CONTEXT
    flops = {name: train_flops_per_token(cfg) * tokens for name, cfg in MODELS.items()}  # per step
    peaks, times, mfu = [], {name: [] for name in benches}, {name: [] for name in benches}
    for _ in range(repeats):
        for name, bench in benches.items():
            peaks.append(matmul_gflops())
            times[name].append(bench.seconds_per_step(steps))
            mfu[name].append(flops[name] / times[name][-1] / 1e9 / peaks[-1])
    step = {name: statistics.median(t) for name, t in times.items()}
    ratio = {k: statistics.median(m / d for m, d in zip(times[k], times["d128"], strict=True))
             for k in ("k1", "k2")}
    return {
        "peak_gflops": statistics.median(peaks),
        "dense_mfu": {name: statistics.median(mfu[name]) for name in ("d128", "d256")},
        "moe_dense_ratio": ratio,
        "step_ms": {name: 1e3 * s for name, s in step.items()},
        "tokens_per_s": {name: tokens / s for name, s in step.items()},
        "achieved_gflops": {name: flops[name] / s / 1e9 for name, s in step.items()},
        "mfu": {name: statistics.median(m) for name, m in mfu.items()},
        "active_params": {name: param_counts(cfg).active for name, cfg in MODELS.items()},
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (the median is reported)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per repeat and model")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (all cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    args = parser.parse_args()
    r = measure(args.repeats, args.steps, args.threads)
    if args.json:
        json.dump(r, sys.stdout)
        print()
        return
    print(f"float32 matmul peak (2048²): {r['peak_gflops']:.0f} GFLOP/s, {r['threads']} threads")
    print(f"{'model':6} {'active params':>13} {'step ms':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>5}")
    for name in MODELS:
        print(f"{name:6} {r['active_params'][name]:>13,} {r['step_ms'][name]:>8.1f} "
              f"{r['tokens_per_s'][name]:>9,.0f} {r['achieved_gflops'][name]:>8.1f} {r['mfu'][name]:>5.0%}")
    print(f"MoE / dense step time at equal active params: top-1 {r['moe_dense_ratio']['k1']:.2f}x, "
          f"top-2 {r['moe_dense_ratio']['k2']:.2f}x")


if __name__ == "__main__":
    main()
