"""The ONE training loop, for dense and MoE models alike (dense is the one-expert case).

``train_run(spec, run_dir)`` trains one ``RunSpec`` and writes its run files atomically into ``run_dir`` (the
contract with ``scaling.store``):

- ``spec.json``: the spec and its run_id, written first.
- ``log.txt``: human-readable progress lines, appended.
- ``progress.json``: ``{"step", "steps"}``, replaced at every logged step (the sweep driver's per-run bar).
- ``checkpoint.pt``: every ``save_every`` steps and on ``stop_after_steps`` (model, optimizer, step, RNG
  states, everything recorded so far, elapsed time); a new ``train_run`` resumes from it and ends exactly as
  an uninterrupted run would. Deleted once the run has finished (``ok`` or ``diverged``).
- ``branch-<step>.pt`` (a trunk, ``spec.branch_steps``): the checkpoint at each step its branches start from,
  kept after the trunk has finished. A branch (``spec.trunk``) without a checkpoint of its own starts from its
  trunk's (``scaling.branches``).
- ``token_losses.npz``: ``steps``, ``tokens``, ``eval_loss`` [n_ckpt] and per-position eval ``losses``
  [n_ckpt, n_positions] at the log-spaced eval checkpoints.
- ``result.json``, written last: status, summary figures, ``metrics`` rows and ``router`` rows.

Eval checkpoints are the steps round(first_checkpoint_step · 2^(j / checkpoints_per_octave)) up to the last
step, plus the last step: the same steps for every run of one batch size. Under ``torchrun`` the same loop
runs data parallel (each rank takes its share of the global batch; rank 0 evaluates and writes the files).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from scaling.branches import branch_checkpoint, trunk_dir
from scaling.config import RunSpec, TrainConfig, cooldown_start, warmup_steps
from scaling.data import Stream, eval_sample, load
from scaling.flops import train_flops_per_token
from scaling.model import Transformer
from scaling.router import RouterStats

EVAL_BATCH = 32  # sequences per eval forward pass: fixed, so capacity-limited MoE evals match across runs
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def lr_at(step: int, train: TrainConfig, total: int) -> float:
    """Learning rate of update ``step`` (0-based) of ``total``: linear warmup, then cosine, WSD or constant,
    reaching ``min_lr_frac · lr`` exactly at the last planned update. The WSD cooldown from s_0 over L_c steps is
    linear or (``decay_shape = "sqrt"``) η · (1 − sqrt((s − s_0 + 1) / L_c)) above the floor (Hägele et al. 2024)."""
    warmup = warmup_steps(train, total)
    if step < warmup:
        return train.lr * (step + 1) / warmup
    low = train.min_lr_frac * train.lr
    if train.schedule == "cosine":
        t = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
        return low + (train.lr - low) * 0.5 * (1 + math.cos(math.pi * t))
    if train.schedule == "wsd":
        start = cooldown_start(train, total)
        if step < start:
            return train.lr
        done = (step - start + 1) / (total - start)
        return train.lr - (train.lr - low) * (math.sqrt(done) if train.decay_shape == "sqrt" else done)
    return train.lr


def eval_steps(train: TrainConfig, total: int, last: bool = True) -> list[int]:
    """Log-spaced eval checkpoints in steps, the same for every run of one batch size, plus (``last``) the last
    step."""
    steps, j = ({total} if last else set()), 0
    while (step := round(train.first_checkpoint_step * 2 ** (j / train.checkpoints_per_octave))) <= total:
        steps.add(step)
        j += 1
    return sorted(steps)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and expert banks) only: not on LayerNorms or the (tied) embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    chosen = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW (fused kernel) with decay on matrices only."""
    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr,
                             betas=(train.beta1, train.beta2), fused=True)


@contextlib.contextmanager
def atomic(path: Path, keep: Path | None = None) -> Iterator[Path]:
    """Yield a temporary name to write ``path`` under; on success it replaces ``path`` (whose previous version
    becomes ``keep`` if given), on any failure (a full disk...) the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        if keep is not None and path.exists():
            os.replace(path, keep)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    with atomic(path) as tmp:
        tmp.write_bytes(data)


def finite(x: float | None) -> float | None:
    """JSON-safe: NaN and inf become null."""
    return x if x is not None and math.isfinite(x) else None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Record:
    """Everything a run has recorded so far; saved in the checkpoint so a resumed run continues it exactly."""

    started_at: str = field(default_factory=now_iso)
    step: int = 0
    train_s: float = 0.0
    wall_s: float = 0.0
    pending: list[list[float]] = field(default_factory=list)  # per-step [loss, ce, aux, z] since the last row
    metrics: list[dict] = field(default_factory=list)
    router: list[dict] = field(default_factory=list)
    router_sums: dict[str, list] | None = None  # RouterStats field -> its sum since the last row, per MoE layer
    router_count: int = 0
    eval_rows: list[tuple[int, float]] = field(default_factory=list)  # (step, eval_loss)
    token_losses: list[np.ndarray] = field(default_factory=list)
    status: str = "ok"
    error: str | None = None
    diverged_step: int | None = None


def by_name(router_sums: dict[str, list] | list[list[float]]) -> dict[str, list]:
    """A checkpoint's router sums by statistic; checkpoints written before they were saved by name hold one row per
    MoE layer, [load_0..load_E-1, entropy, dropped_frac]."""
    if isinstance(router_sums, dict):
        return router_sums
    return {"load": [row[:-2] for row in router_sums], "entropy": [row[-2] for row in router_sums],
            "dropped_frac": [row[-1] for row in router_sums]}


@dataclass(frozen=True)
class Placement:
    """Device and data-parallel rank of this process."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def keep_freed_memory() -> None:
    """Stop glibc from handing freed activation buffers back to the OS, which makes every training step
    page-fault them in again: 5-10% faster small-model CPU steps (measured). No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 25)  # 32 MiB, glibc's largest: bigger buffers stay on the heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def place(threads: int) -> Placement:
    """CUDA if available, else CPU with ``threads`` threads (the spec's ``train.threads``); joins the process group
    when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    torch.set_num_threads(threads)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        keep_freed_memory()
    return Placement(device, dist.get_rank() if world > 1 else 0, world)


class HeldSignals:
    """SIGUSR2 (Slurm's warning before a timeout or preemption, submitit's requeue signal) and SIGTERM (a shutdown)
    are held until the current step is done, so that the run can checkpoint exactly where it is; ``deliver`` then
    sends every held signal, in the order they came, to the handlers installed before (submitit's requeue, or the
    default), and holds again if training goes on (a handler that ignores the signal). Leaving the block without
    an exception delivers what is still held: a signal during the last step reaches its handler once the run's
    result is written.

    Only a single process in its main thread holds signals: data-parallel ranks would checkpoint at different steps.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self, active: bool) -> None:
        self.active = active and threading.current_thread() is threading.main_thread()
        self.pending: list[int] = []
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> HeldSignals:
        self.install()
        return self

    def install(self) -> None:
        if self.active:
            self.previous = {sig: signal.signal(sig, self.hold) for sig in self.SIGNALS}

    def hold(self, signum: int, frame: Any) -> None:
        if signum not in self.pending:
            self.pending.append(signum)

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.deliver(again=False)
        self.restore()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def deliver(self, again: bool = True) -> None:
        held, self.pending = self.pending, []
        if not held:
            return
        self.restore()
        for sig in held:
            signal.raise_signal(sig)  # its handler runs now: submitit requeues and exits, the default ends us
        if again:
            self.install()


def all_mean(t: Tensor, where: Placement) -> Tensor:
    if where.world > 1:
        dist.all_reduce(t)
        t /= where.world
    return t


@torch.no_grad()
def evaluate(model: Transformer, x: Tensor, y: Tensor, n_eval: int, n_tokens: int,
             autocast: contextlib.AbstractContextManager) -> tuple[float, np.ndarray]:
    """Mean loss over the first ``n_eval`` eval positions and the per-token losses of the first ``n_tokens``,
    from one forward pass over the eval sample."""
    model.eval()
    with autocast:
        losses = torch.cat([model(x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH], reduction="none")[1].flatten()
                            for i in range(0, len(x), EVAL_BATCH)])
    model.train()
    return losses[:n_eval].mean().item(), losses[:n_tokens].float().cpu().numpy()


def clip_grad_norm(grads: list[Tensor], max_norm: float) -> Tensor:
    """Scale ``grads`` (one device and dtype) in place to a total L2 norm of at most ``max_norm``; returns the
    norm before clipping. The arithmetic of ``nn.utils.clip_grad_norm_(foreach=True)`` op for op (bit-identical,
    tested) without its per-call grouping of tensors by device and dtype: half its time on small models."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp_(max=1.0))
    return total


def train_step(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, grad_clip: float,
               autocast: contextlib.AbstractContextManager) -> tuple[Tensor, list]:
    """Backprop CE + aux + z, clip, update; returns detached [loss, ce, aux, z], router stats."""
    with autocast:
        _, ce, aux = net(x, y)
    loss = ce + aux["aux_loss"] + aux["z_loss"] if aux["router"] else ce  # dense: no zero-valued terms to add
    loss.backward()
    clip_grad_norm([p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None], grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return torch.stack([loss, ce, aux["aux_loss"], aux["z_loss"]]).detach(), aux["router"]


class Run:
    """One run's mutable state around the shared loop: model, optimizer, data, what has been recorded."""

    def __init__(self, spec: RunSpec, run_dir: Path, where: Placement) -> None:
        self.spec, self.dir, self.where = spec, run_dir, where
        cfg, train = spec.model, spec.train
        corpus = load(spec.corpus, spec.tokenizer, cfg.vocab_size)
        self.stream = Stream(corpus, spec.unique_tokens, cfg.context, spec.seed)
        n_eval = max(train.eval_tokens, train.token_loss_tokens)
        self.eval_x, self.eval_y = (t.to(where.device) for t in eval_sample(corpus, cfg.context, n_eval))
        torch.manual_seed(spec.seed)
        self.model = Transformer(cfg).to(where.device)
        if where.rank:  # own router noise per rank; the initial weights are rank 0's (DDP broadcasts them)
            torch.manual_seed(spec.seed * 1_000_003 + where.rank)
        self.opt = make_optimizer(self.model, train)
        self.net = self.model
        if where.world > 1:
            ids = [where.device.index] if where.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if where.device.type == "cuda"
                         else contextlib.nullcontext())
        self.record = Record()
        self.notes: list[str] = []  # what happened to the run that its result should say (checkpoints set aside)
        self.signals = HeldSignals(active=False)

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoint.pt"

    @property
    def previous_checkpoint(self) -> Path:
        """The checkpoint before the last one, kept in case the last one does not load."""
        return self.dir / "checkpoint.prev.pt"

    def rng_states(self) -> list[Tensor]:
        cuda = self.where.device.type == "cuda"
        state = torch.cuda.get_rng_state(self.where.device) if cuda else torch.get_rng_state()
        if self.where.world == 1:
            return [state]
        states: list[Tensor] = [None] * self.where.world  # type: ignore[list-item]
        dist.all_gather_object(states, state.cpu())
        return states

    def save(self, path: Path | None = None) -> None:
        states = self.rng_states()
        if self.where.main:
            with atomic(path or self.checkpoint, keep=None if path else self.previous_checkpoint) as tmp:
                torch.save({"run_id": self.spec.run_id, "model": self.model.state_dict(),
                            "optimizer": self.opt.state_dict(), "rng": states, "record": asdict(self.record),
                            "threads": torch.get_num_threads()}, tmp)

    def resume(self) -> bool:
        """Restore the latest checkpoint of this same spec that loads, if any (else a branch starts from its trunk's);
        returns whether it did.

        One that does not load is renamed ``NAME.damaged-TIME`` and said in the log; the previous checkpoint (the
        last two are kept) is tried next, then the run starts over."""
        for path in (self.checkpoint, self.previous_checkpoint):
            if not path.exists():
                continue
            try:
                state = torch.load(path, map_location=self.where.device, weights_only=False)
                run_id = state["run_id"]
            except Exception as exc:  # any unreadable checkpoint is set aside, the run goes on
                self.set_aside(path, exc)
                continue
            if run_id != self.spec.run_id:
                continue
            threads = state.get("threads")
            if threads is None:  # its thread count is unknown: resuming could mix two in one run
                self.set_aside(path, ValueError("it was written before checkpoints recorded their thread count"))
                continue
            if threads != torch.get_num_threads():
                raise ValueError(f"run {run_id}: {path.name} was written with {threads} CPU threads, this process "
                                 f"has {torch.get_num_threads()}: resuming would mix two thread counts in one run "
                                 "(delete it to start over)")
            try:
                self.restore(state)
            except Exception as exc:  # e.g. tensors of another shape
                self.set_aside(path, exc)
                continue
            return True
        return self.start_branch() if self.spec.trunk else False

    def start_branch(self) -> bool:
        """A branch without a checkpoint of its own starts from its trunk's at the cooldown start: the state (and
        the record so far) that a dedicated run with the same schedule has at that step, since the trunk's LR equals
        it up to there and the data stream depends on the step alone."""
        spec = self.spec
        path = branch_checkpoint(trunk_dir(self.dir, spec.trunk), spec.cooldown_start)
        if not path.exists():
            raise FileNotFoundError(f"branch {spec.run_id}: its trunk {spec.trunk} has no checkpoint at step "
                                    f"{spec.cooldown_start} ({path}): train the trunk first")
        state = torch.load(path, map_location=self.where.device, weights_only=False)
        if state["run_id"] != spec.trunk or state["record"]["step"] != spec.cooldown_start:
            raise ValueError(f"branch {spec.run_id}: {path} is not trunk {spec.trunk} at step {spec.cooldown_start}")
        self.restore(state)
        self.record.started_at = now_iso()
        self.log(f"branching from trunk {spec.trunk} at step {spec.cooldown_start}")
        return True

    def set_aside(self, path: Path, exc: Exception) -> None:
        if not self.where.main:
            return
        target = path.with_name(f"{path.name}.damaged-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}")
        os.replace(path, target)
        first = " ".join(str(exc).split())[:200]
        note = f"{path.name} does not load ({type(exc).__name__}: {first}): moved aside as {target.name}"
        self.notes.append(note)
        self.log(note)
        print(f"run {self.spec.run_id}: {note}", flush=True)

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        rng = state["rng"][self.where.rank] if len(state["rng"]) > self.where.rank else state["rng"][0]
        if self.where.device.type == "cuda":
            torch.cuda.set_rng_state(rng.cpu(), self.where.device)
        else:
            torch.set_rng_state(rng)
        self.record = Record(**state["record"])

    def log(self, line: str) -> None:
        if self.where.main:
            with open(self.dir / "log.txt", "a") as f:
                f.write(f"{datetime.now().strftime('%H:%M:%S')} {line}\n")

    def step(self, step: int) -> tuple[Tensor, list]:
        """One optimizer update at ``step`` (0-based) of the planned schedule."""
        spec, where = self.spec, self.where
        lr = lr_at(step, spec.train, spec.steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = (t.to(where.device, non_blocking=True)
                for t in self.stream.batch(step, spec.train.batch_size, where.rank, where.world))
        return train_step(self.net, self.opt, x, y, spec.train.grad_clip, self.autocast)

    def add_router(self, stats: list[RouterStats], sums: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
        """Add one step's router statistics, by name and stacked over MoE layers, to ``sums``."""
        if not stats:
            return None
        now = {name: torch.stack([getattr(s, name) for s in stats]) for name in RouterStats._fields}
        return now if sums is None else {name: sums[name] + value for name, value in now.items()}

    def bank(self, values: list[Tensor], clock: float) -> None:
        """Move per-step losses into the record (averaged over ranks) and add the time since ``clock``."""
        rec = self.record
        if values:
            rec.pending += all_mean(torch.stack(values).float(), self.where).tolist()
        elapsed = time.perf_counter() - clock
        rec.train_s += elapsed
        rec.wall_s += elapsed

    def flush(self, step: int) -> bool:
        """Append the metrics row for the steps since the last row; False if a loss was not finite."""
        rec = self.record
        rows = np.array(rec.pending)
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            rec.status, rec.diverged_step = "diverged", step - len(rows) + 1 + int(bad.argmax())
            rec.error = f"non-finite loss at step {rec.diverged_step}"
            return False
        loss, ce, aux, z = rows.mean(axis=0).tolist()
        rec.metrics.append({"step": step, "tokens": step * self.tokens_per_step, "train_loss": loss,
                            "ce_loss": ce, "aux_loss": aux, "z_loss": z, "eval_loss": None,
                            "lr": lr_at(step - 1, self.spec.train, self.spec.steps), "wall_s": rec.wall_s})
        rec.pending = []
        return True

    @property
    def tokens_per_step(self) -> int:
        return self.spec.train.batch_size * self.spec.model.context

    def checkpoint_eval(self, step: int, router_sums: dict[str, Tensor] | None) -> None:
        """Eval loss, per-token losses and the router statistics accumulated since the last checkpoint: one row per
        MoE layer and expert, with each statistic under its name (a per-layer one repeated on its experts' rows)."""
        rec, train, cfg = self.record, self.spec.train, self.spec.model
        tokens = step * self.tokens_per_step
        if router_sums is not None:
            means = {name: (all_mean(s, self.where) / rec.router_count).tolist() for name, s in router_sums.items()}
            for layer in range(cfg.n_moe_layers):
                at = {name: values[layer] for name, values in means.items()}
                rec.router += [{"step": step, "tokens": tokens, "layer": layer, "expert": e,
                                **{name: v[e] if isinstance(v, list) else v for name, v in at.items()}}
                               for e in range(cfg.n_experts)]
            rec.router_count = 0
        if not self.where.main:
            return
        eval_loss, losses = evaluate(self.model, self.eval_x, self.eval_y, train.eval_tokens,
                                     train.token_loss_tokens, self.autocast)
        rec.eval_rows.append((step, eval_loss))
        rec.token_losses.append(losses)
        rec.metrics[-1]["eval_loss"] = finite(eval_loss)

    def loop(self, stop_after_steps: int | None) -> None:
        """Train from the recorded step to the end (or ``stop_after_steps``), recording as it goes."""
        spec, rec, train = self.spec, self.record, self.spec.train
        total = spec.steps
        end = total if stop_after_steps is None else min(total, stop_after_steps)
        trunk = bool(spec.branch_steps)  # no last-step row or eval: its branch checkpoints match dedicated runs
        evals = set(eval_steps(train, total, last=not trunk))
        values: list[Tensor] = []
        sums = ({name: torch.tensor(v, device=self.where.device) for name, v in by_name(rec.router_sums).items()}
                if rec.router_sums else None)
        clock = time.perf_counter()
        for s in range(rec.step, end):
            loss, stats = self.step(s)
            values.append(loss)
            sums = self.add_router(stats, sums)
            rec.router_count += bool(stats)
            step = s + 1
            held = self.signals.pending[0] if self.signals.pending else None
            boundary = step % train.log_every == 0 or step in evals or (step == total and not trunk)
            save = step < total and (step % train.save_every == 0 or step == end or held is not None)
            keep = step in spec.branch_steps
            if not (boundary or save or keep or step == total):
                continue
            self.bank(values, clock)
            values, rec.step = [], step
            clock = time.perf_counter()
            if boundary:
                if not self.flush(step):
                    return
                if step in evals:
                    self.checkpoint_eval(step, sums)
                    sums = None
                self.log(self.progress(step))
                self.note_progress(step)
            if save or keep:
                rec.router_sums = {name: s.tolist() for name, s in sums.items()} if sums is not None else None
            if keep:  # before the periodic one: a resumed trunk never starts past a branch checkpoint it lacks
                self.save(branch_checkpoint(self.dir, step))
            if save:
                self.save()
            rec.wall_s += time.perf_counter() - clock
            clock = time.perf_counter()
            if held is not None and step < total:
                self.log(f"checkpointed at step {step} on {signal.Signals(held).name}")
                self.signals.deliver()
        if rec.step < total:
            rec.status, rec.error = "interrupted", f"stopped after step {rec.step} of {total}"

    def note_progress(self, step: int) -> None:
        if self.where.main:
            data = json.dumps({"step": step, "steps": self.spec.steps}).encode()
            write_atomic(self.dir / "progress.json", data)

    def progress(self, step: int) -> str:
        row, rec = self.record.metrics[-1], self.record
        rate = step * self.tokens_per_step / max(rec.train_s, 1e-9)
        evaluated = f" eval {row['eval_loss']:.4f}" if row["eval_loss"] is not None else ""
        return (f"step {step}/{self.spec.steps} loss {row['train_loss']:.4f} ce {row['ce_loss']:.4f} "
                f"aux {row['aux_loss']:.2e} z {row['z_loss']:.2e} lr {row['lr']:.2e}{evaluated} "
                f"{rate:,.0f} tok/s")

    def result(self) -> dict:
        spec, rec = self.spec, self.record
        tokens = rec.step * self.tokens_per_step
        last_ce = next((m["ce_loss"] for m in reversed(rec.metrics)), None)
        last_eval = next((e for _, e in reversed(rec.eval_rows)), None)
        rate = tokens / max(rec.train_s, 1e-9)
        return {
            "run_id": spec.run_id, "status": rec.status, "error": rec.error,
            "diverged_step": rec.diverged_step, "steps": rec.step, "tokens_seen": tokens,
            "epochs_done": rec.step * spec.train.batch_size / self.stream.n_windows,  # passes over U's windows
            "unique_tokens": spec.unique_tokens,
            "final_train_loss": finite(last_ce), "final_eval_loss": finite(last_eval),
            "wall_s": rec.wall_s, "train_s": rec.train_s, "tokens_per_s": rate,
            "flops_per_s": train_flops_per_token(spec.model) * rate,
            "params": self.model.num_params(), "active_params": self.model.active_params(),
            "threads": torch.get_num_threads(),
            "started_at": rec.started_at, "finished_at": now_iso(),
            "notes": self.notes, "metrics": rec.metrics, "router": rec.router,
        }

    def write(self, result: dict) -> None:
        """token_losses.npz, then result.json last; the checkpoint goes once the run has finished."""
        rec = self.record
        n_positions = self.spec.train.token_loss_tokens
        arrays = {"steps": np.array([s for s, _ in rec.eval_rows], dtype=np.int64),
                  "tokens": np.array([s * self.tokens_per_step for s, _ in rec.eval_rows], dtype=np.int64),
                  "eval_loss": np.array([e for _, e in rec.eval_rows], dtype=np.float64),
                  "losses": np.array(rec.token_losses, dtype=np.float32).reshape(-1, n_positions)}
        with atomic(self.dir / "token_losses.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        write_atomic(self.dir / "result.json", json.dumps(result, indent=1).encode())
        if result["status"] in ("ok", "diverged"):
            self.checkpoint.unlink(missing_ok=True)
            self.previous_checkpoint.unlink(missing_ok=True)


def train_run(spec: RunSpec, run_dir: Path, *, stop_after_steps: int | None = None) -> dict:
    """Train ``spec`` (resuming from ``run_dir/checkpoint.pt`` if present) and write its run files.

    A non-finite loss ends the run with status "diverged" (never raised). ``stop_after_steps`` stops after
    that many updates with a checkpoint and status "interrupted"; calling again resumes. Returns result.json
    without its "metrics" and "router" rows.
    """
    if spec.steps < 1:
        raise ValueError(f"run {spec.run_id}: {spec.tokens} tokens is less than one batch "
                         f"({spec.train.batch_size} x {spec.model.context} tokens)")
    threads = torch.get_num_threads()
    try:
        return train_in_place(spec, Path(run_dir), stop_after_steps)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, e.g. a test process training many runs


def train_in_place(spec: RunSpec, run_dir: Path, stop_after_steps: int | None) -> dict:
    started = time.perf_counter()
    where = place(spec.train.threads)
    if spec.train.batch_size % where.world:
        raise ValueError(f"batch_size={spec.train.batch_size} is not divisible by {where.world} processes")
    if where.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_json = json.dumps({**spec.to_dict(), "run_id": spec.run_id}, indent=1)
        write_atomic(run_dir / "spec.json", spec_json.encode())
    run = Run(spec, run_dir, where)
    resumed = run.resume()
    if run.notes and not resumed:  # a checkpoint was set aside: start over from a fresh initial state
        notes, run = run.notes, Run(spec, run_dir, where)
        run.notes = notes
    run.log(f"{'resuming at step ' + str(run.record.step) if resumed else 'starting'} run {spec.run_id}: "
            f"{spec.steps} steps, {run.model.num_params():,} params ({run.model.active_params():,} active), "
            f"{where.world} process(es) on {where.device}, {torch.get_num_threads()} CPU thread(s)")
    run.note_progress(run.record.step)
    run.record.status, run.record.error = "ok", None
    run.record.wall_s += time.perf_counter() - started  # data and model set-up
    with HeldSignals(active=where.world == 1) as run.signals:  # a stop signal is let through after the write
        try:
            run.loop(stop_after_steps)
        except KeyboardInterrupt:
            run.record.status, run.record.error = "interrupted", "interrupted by the user"
            if where.main:
                run.write(run.result())
            raise
        result = run.result()
        if where.main:
            run.write(result)
            run.log(f"{result['status']}: {result['steps']} steps, eval loss {result['final_eval_loss']}, "
                    f"{result['tokens_per_s']:,.0f} tok/s")
        if where.world > 1:  # no rank leaves (and tears down its process group) while rank 0 still writes
            dist.barrier()
    return {k: v for k, v in result.items() if k not in ("metrics", "router")}


def execute(spec: dict, run_dir: str) -> dict:
    """Picklable entry point for process pools and submitit: RunSpec as a dict, the run directory as str."""
    return train_run(RunSpec.from_dict(spec), Path(run_dir))
