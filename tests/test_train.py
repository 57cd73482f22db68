"""The training loop on the real shakespeare corpus: learning, run files, determinism, resume, divergence."""

import dataclasses
import json
import math
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import cli_in_process

from scaling import train
from scaling.config import ModelConfig, RunSpec, TrainConfig
from scaling.flops import param_counts
from scaling.model import Transformer
from scaling.router import RouterStats
from scaling.runfiles import ROUTER_FIELDS, ROUTER_STATS
from scaling.store import connect
from scaling.train import clip_grad_norm, eval_steps, execute, lr_at, train_run

STEPS, BATCH, CONTEXT = 40, 16, 32


pytestmark = pytest.mark.usefixtures("shakespeare")


def make_spec(steps: int = STEPS, seed: int = 0, train_overrides: dict | None = None, **model) -> RunSpec:
    cfg = ModelConfig(**{**dict(vocab_size=256, context=CONTEXT, d_model=32, n_layers=2, n_heads=2, d_ff=128),
                         **model})
    tc = TrainConfig(**{**dict(lr=3e-3, batch_size=BATCH, eval_tokens=2048, token_loss_tokens=512,
                               log_every=5, save_every=10, first_checkpoint_step=4, threads=1),
                        **(train_overrides or {})})
    return RunSpec(model=cfg, train=tc, tokens=steps * BATCH * CONTEXT, unique_tokens=50_000, seed=seed)


def files(run_dir: Path) -> tuple[dict, dict]:
    result = json.loads((run_dir / "result.json").read_text())
    with np.load(run_dir / "token_losses.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return result, arrays


VARIANTS = {
    "dense": {},
    "moe": dict(n_experts=4, top_k=2),
    "noisy_moe": dict(n_experts=4, router_noise=True),
    "capacity_moe": dict(n_experts=4, capacity_factor=1.0),
    "sigmoid_router": dict(n_experts=4, top_k=2, router="sigmoid-topk"),
    "shared_weights": dict(n_experts=4, share_weights=True, n_layers=3, positional="rotary"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_learns_and_writes_run_files(name, tmp_path):
    spec = make_spec(**VARIANTS[name])
    summary = train_run(spec, tmp_path)
    result, arrays = files(tmp_path)
    assert summary == {k: v for k, v in result.items() if k not in ("metrics", "router")}
    assert result["status"] == "ok" and result["error"] is None and result["steps"] == STEPS
    assert result["tokens_seen"] == STEPS * BATCH * CONTEXT
    # the stream cuts the first U tokens into whole windows of context + 1 tokens and passes over those
    assert result["epochs_done"] == pytest.approx(result["steps"] * BATCH / (50_000 // (CONTEXT + 1)))
    counts = param_counts(spec.model)
    assert (result["params"], result["active_params"]) == (counts.total, counts.active)
    assert result["flops_per_s"] > 0 and result["tokens_per_s"] > 0 and result["train_s"] <= result["wall_s"]
    assert not (tmp_path / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "spec.json").read_text()) == {**spec.to_dict(), "run_id": spec.run_id}
    assert "ok: 40 steps" in (tmp_path / "log.txt").read_text()

    checkpoints = eval_steps(spec.train, STEPS)
    assert checkpoints == [4, 8, 16, 32, 40]
    assert arrays["steps"].tolist() == checkpoints and arrays["losses"].shape == (5, 512)
    assert arrays["tokens"].tolist() == [s * BATCH * CONTEXT for s in checkpoints]
    assert arrays["eval_loss"][-1] < arrays["eval_loss"][0] - 0.5  # it learns
    assert result["final_eval_loss"] == pytest.approx(arrays["eval_loss"][-1])
    assert arrays["losses"][-1].mean() < arrays["losses"][0].mean()

    metrics = result["metrics"]
    assert [m["step"] for m in metrics] == sorted({*range(5, 41, 5), *checkpoints})
    assert [m["step"] for m in metrics if m["eval_loss"] is not None] == checkpoints
    assert all(math.isfinite(m[k]) for m in metrics for k in ("train_loss", "ce_loss", "aux_loss", "z_loss"))
    assert result["final_train_loss"] == metrics[-1]["ce_loss"] < metrics[0]["ce_loss"]
    for m in metrics:
        assert m["train_loss"] == pytest.approx(m["ce_loss"] + m["aux_loss"] + m["z_loss"])

    router = result["router"]
    if not spec.model.is_moe:
        assert router == [] and all(m["aux_loss"] == 0 for m in metrics)
        return
    assert all(m["aux_loss"] > 0 and m["z_loss"] > 0 for m in metrics)
    assert len(router) == len(checkpoints) * spec.model.n_moe_layers * spec.model.n_experts
    assert all(r.keys() == {"step", "layer", "expert", *ROUTER_FIELDS} for r in router)  # the store's columns
    assert RouterStats._fields == ROUTER_STATS
    for step in checkpoints:
        for layer in range(spec.model.n_moe_layers):
            rows = [r for r in router if r["step"] == step and r["layer"] == layer]
            assert sum(r["load"] for r in rows) == pytest.approx(1.0)
            assert 0 < rows[0]["entropy"] <= math.log(4) + 1e-6
            dropped = rows[0]["dropped_frac"]
            assert (dropped > 0) if spec.model.capacity_factor else dropped == 0


def test_deterministic(tmp_path):
    spec = make_spec(steps=20, n_experts=4, router_noise=True)
    train_run(spec, tmp_path / "a")
    train_run(spec, tmp_path / "b")
    (a, za), (b, zb) = files(tmp_path / "a"), files(tmp_path / "b")
    keys = ("train_loss", "ce_loss", "aux_loss", "z_loss", "eval_loss")
    assert [[m[k] for k in keys] for m in a["metrics"]] == [[m[k] for k in keys] for m in b["metrics"]]
    assert np.array_equal(za["losses"], zb["losses"])
    other = train_run(make_spec(steps=20, seed=1, n_experts=4, router_noise=True), tmp_path / "c")
    assert other["final_train_loss"] != a["final_train_loss"]


@pytest.mark.parametrize("stop", [12, 17])  # on a checkpoint-save step, and between saves and log rows
def test_resume_equals_uninterrupted(tmp_path, stop):
    spec = make_spec(steps=30, n_experts=4, router_noise=True, capacity_factor=1.5)
    full = train_run(spec, tmp_path / "full")
    part = train_run(spec, tmp_path / "resumed", stop_after_steps=stop)
    assert part["status"] == "interrupted" and part["steps"] == stop
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "resumed" / "result.json").read_text())["status"] == "interrupted"
    resumed = train_run(spec, tmp_path / "resumed")
    assert resumed["status"] == "ok" and resumed["steps"] == 30
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], abs=1e-6)
    assert resumed["final_eval_loss"] == pytest.approx(full["final_eval_loss"], abs=1e-6)
    (a, za), (b, zb) = files(tmp_path / "full"), files(tmp_path / "resumed")
    strip = [{k: v for k, v in m.items() if k != "wall_s"} for m in a["metrics"]]
    assert strip == [{k: v for k, v in m.items() if k != "wall_s"} for m in b["metrics"]]
    assert a["router"] == b["router"]
    np.testing.assert_allclose(za["losses"], zb["losses"], atol=1e-6)
    assert "resuming at step" in (tmp_path / "resumed" / "log.txt").read_text()


def test_a_checkpoint_written_before_routers_were_modules_resumes(tmp_path):
    """Its parameters under their old names (``ffn.router.weight``, ``ffn.noise.weight``) and its router sums as
    one row per layer, [load_0..load_E-1, entropy, dropped_frac]: the run ends as an uninterrupted one."""
    spec = make_spec(steps=30, n_experts=4, router_noise=True, capacity_factor=1.5)
    train_run(spec, tmp_path / "full")
    train_run(spec, tmp_path / "resumed", stop_after_steps=17)
    path = tmp_path / "resumed" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    state["model"] = {k.replace("router.gate.", "router.").replace("router.noise.", "noise."): v
                      for k, v in state["model"].items()}
    sums = state["record"]["router_sums"]
    state["record"]["router_sums"] = [[*load, entropy, dropped] for load, entropy, dropped in
                                      zip(sums["load"], sums["entropy"], sums["dropped_frac"], strict=True)]
    torch.save(state, path)
    (tmp_path / "resumed" / "checkpoint.prev.pt").unlink(missing_ok=True)
    assert train_run(spec, tmp_path / "resumed")["status"] == "ok"
    (a, _), (b, _) = files(tmp_path / "full"), files(tmp_path / "resumed")
    assert [{k: v for k, v in m.items() if k != "wall_s"} for m in a["metrics"]] == [
        {k: v for k, v in m.items() if k != "wall_s"} for m in b["metrics"]]
    assert a["router"] == b["router"]
    assert "resuming at step 17" in (tmp_path / "resumed" / "log.txt").read_text()


def test_planted_nan_marks_diverged(tmp_path, monkeypatch):
    clean = lr_at
    monkeypatch.setattr(train, "lr_at", lambda s, tc, total: math.nan if s == 12 else clean(s, tc, total))
    summary = train_run(make_spec(steps=30, n_experts=4), tmp_path)
    result, arrays = files(tmp_path)
    assert summary["status"] == result["status"] == "diverged"
    assert result["diverged_step"] == 14  # update 12 (0-based) writes NaN weights; step 14's loss is NaN
    assert "non-finite" in result["error"] and result["steps"] == 15
    assert [m["step"] for m in result["metrics"]] == [4, 5, 8, 10]
    assert arrays["steps"].tolist() == [4, 8]
    assert result["final_eval_loss"] == pytest.approx(arrays["eval_loss"][-1])
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipped, and left alone
def test_clip_grad_norm_is_torchs(max_norm):
    """The trainer's clipping gives torch's clip_grad_norm_ gradients and norm bit for bit."""
    torch.manual_seed(0)
    model = Transformer(make_spec(n_experts=4).model)
    x = torch.randint(0, 256, (4, CONTEXT))
    _, loss, aux = model(x, x)
    (loss + aux["aux_loss"] + aux["z_loss"]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    want = torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm, foreach=True)
    got = clip_grad_norm(grads, max_norm)
    assert torch.equal(got, want)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert (got > max_norm) == (max_norm < 1)


def test_schedules_and_checkpoint_steps():
    tc = TrainConfig(lr=1.0, min_lr_frac=0.1, warmup_frac=0.1, first_checkpoint_step=16,
                     checkpoints_per_octave=2)
    lrs = [lr_at(s, tc, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    wsd = TrainConfig(lr=1.0, min_lr_frac=0.0, warmup_frac=0.0, schedule="wsd", decay_frac=0.2)
    lrs = [lr_at(s, wsd, 100) for s in range(100)]
    assert lrs[:80] == [1.0] * 80 and lrs[-1] == 0.0 and lrs[80] == pytest.approx(0.95)
    assert lr_at(99, TrainConfig(schedule="constant", lr=0.5), 100) == 0.5
    assert eval_steps(tc, 100) == [16, 23, 32, 45, 64, 91, 100]
    assert eval_steps(tc, 10) == [10]


def test_execute_is_picklable(tmp_path):
    spec = make_spec(steps=8)
    assert pickle.loads(pickle.dumps(execute)) is execute
    result = execute(json.loads(json.dumps(spec.to_dict())), str(tmp_path))
    assert result["run_id"] == spec.run_id and result["status"] == "ok"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, spec: dict, run_dir: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    execute(spec, run_dir)
    torch.distributed.destroy_process_group()


def test_data_parallel_matches_single_process(tmp_path):
    """Two gloo processes with half the global batch each follow the single-process loss curve.

    The gradients are the same mean over the same 16 sequences, summed in a different order (all-reduce of two
    halves), so the curves agree to float32 round-off amplified over 20 AdamW steps: 1e-4 is ample for a dense
    model (an MoE's per-rank load-balancing loss would differ by design).
    """
    spec = make_spec(steps=20)
    single = train_run(spec, tmp_path / "single")
    mp.spawn(ddp_worker, args=(spec.to_dict(), str(tmp_path / "ddp"), free_port()), nprocs=2)
    (a, za), (b, zb) = files(tmp_path / "single"), files(tmp_path / "ddp")
    assert b["status"] == "ok" and b["steps"] == single["steps"]
    curve = [m["train_loss"] for m in a["metrics"]]
    np.testing.assert_allclose([m["train_loss"] for m in b["metrics"]], curve, rtol=1e-4)
    np.testing.assert_allclose(zb["eval_loss"], za["eval_loss"], rtol=1e-4)


@pytest.mark.parametrize("damaged", [["checkpoint.pt"], ["checkpoint.pt", "checkpoint.prev.pt"]])
def test_a_checkpoint_that_does_not_load_is_set_aside(tmp_path, damaged):
    """A corrupt last checkpoint: the run resumes from the one before (the last two are kept) or, with both
    corrupt, starts over; either way it ends as an uninterrupted run does, and its log and result say what
    was set aside."""
    spec = make_spec(steps=30)
    full = train_run(spec, tmp_path / "full")
    run_dir = tmp_path / "resumed"
    train_run(spec, run_dir, stop_after_steps=17)  # checkpoints at steps 10 and 17
    for name in damaged:
        (run_dir / name).write_bytes(np.random.default_rng(0).bytes(4096))
    resumed = train_run(spec, run_dir)
    assert resumed["status"] == "ok"
    assert resumed["final_eval_loss"] == pytest.approx(full["final_eval_loss"], abs=1e-6)
    text = (run_dir / "log.txt").read_text()
    for name in damaged:
        assert f"{name} does not load (UnpicklingError" in text, text
        assert len(list(run_dir.glob(f"{name}.damaged-*"))) == 1
    assert ("resuming at step 10 run" in text) == (len(damaged) == 1), text
    result = json.loads((run_dir / "result.json").read_text())
    assert [n.split(" (")[0] for n in result["notes"]] == [f"{n} does not load" for n in damaged]
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "checkpoint.prev.pt").exists()


def test_a_failed_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk while saving: the run fails with the OS error, the half-written temporary file is removed and
    the previous checkpoint is intact, so a rerun resumes from it."""
    import errno

    save, calls = torch.save, []

    def disk_full(obj, path):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, path)

    spec = make_spec(steps=30)
    with monkeypatch.context() as m:
        m.setattr(train.torch, "save", disk_full)
        with pytest.raises(OSError, match="No space left"):
            train_run(spec, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["record"]["step"] == 10
    assert train_run(spec, tmp_path)["status"] == "ok"
    assert "resuming at step 10 run" in (tmp_path / "log.txt").read_text()


def test_thread_count_is_part_of_the_run(tmp_path):
    """Same spec and thread count: bit-identical losses. The count is in the spec (and its id) and in result.json;
    a checkpoint written with another count is refused, never mixed into the run."""
    two = make_spec(steps=20, train_overrides={"threads": 2})
    assert two.run_id != make_spec(steps=20).run_id
    a, b = train_run(two, tmp_path / "a"), train_run(two, tmp_path / "b")
    assert a["threads"] == 2 and a["final_eval_loss"] == b["final_eval_loss"]
    assert [m["train_loss"] for m in files(tmp_path / "a")[0]["metrics"]] == \
        [m["train_loss"] for m in files(tmp_path / "b")[0]["metrics"]]
    one = make_spec(steps=20)
    train_run(one, tmp_path / "c", stop_after_steps=10)
    state = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)
    assert state["threads"] == 1
    torch.save({**state, "threads": 2}, tmp_path / "c" / "checkpoint.pt")
    with pytest.raises(ValueError, match="written with 2 CPU threads, this process has 1"):
        train_run(one, tmp_path / "c")


def test_a_checkpoint_without_a_thread_count_is_not_resumed(tmp_path):
    """Checkpoints of the previous release record no thread count (it was cores / workers): the run starts over
    rather than mix two counts."""
    spec = make_spec(steps=20)
    full = train_run(spec, tmp_path / "full")
    train_run(spec, tmp_path / "old", stop_after_steps=10)
    state = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=False)
    del state["threads"]
    torch.save(state, tmp_path / "old" / "checkpoint.pt")
    resumed = train_run(spec, tmp_path / "old")
    assert resumed["final_eval_loss"] == full["final_eval_loss"]
    text = (tmp_path / "old" / "log.txt").read_text()
    assert "checkpoint.pt does not load (ValueError: it was written before checkpoints recorded" in text
    assert "resuming at step" not in text


@pytest.mark.slow
def test_a_sigmoid_routed_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    """``[model] router = "sigmoid-topk"`` through ``scaling run`` (plan, train, ingest): its router statistics
    reach the store by name, and its runs are not the softmax-routed ones."""
    sweep = tmp_path / "sigmoid.toml"
    sweep.write_text('name = "sigmoid"\nbudgets = [3e9]\nunique_tokens = 200_000\ncontext = 32\nmin_steps = 20\n'
                     '[sparsity]\nexperts = [4]\ntop_k = 2\n[sizes]\ncount = 1\n[shape]\nhead_dim = 8\n'
                     'min_d_model = 16\n[model]\nrouter = "sigmoid-topk"\n'
                     '[train]\nbatch_size = 16\neval_tokens = 2048\ntoken_loss_tokens = 512\n')
    db = tmp_path / "store.duckdb"
    done = cli_in_process(monkeypatch, capsys, "run", str(sweep), "--db", str(db), "--runs-dir",
                          str(tmp_path / "runs"))
    assert done.returncode == 0, done.stderr
    con = connect(db, read_only=True)
    try:
        (run_id, spec), = con.execute("SELECT run_id, spec FROM runs WHERE status = 'ok'").fetchall()
        stats = con.execute(f"SELECT layer, expert, {', '.join(ROUTER_STATS)} FROM router_stats "
                            "WHERE step = (SELECT max(step) FROM router_stats)").df()
    finally:
        con.close()
    spec = RunSpec.from_dict(json.loads(spec))
    assert spec.model.router == "sigmoid-topk" and spec.run_id == run_id
    assert run_id != dataclasses.replace(spec, model=dataclasses.replace(spec.model, router="softmax-topk")).run_id
    assert len(stats) == spec.model.n_moe_layers * 4
    assert np.allclose(stats.groupby("layer").load.sum(), 1.0)
    assert ((stats.entropy > 0) & (stats.entropy <= math.log(4) + 1e-6)).all() and (stats.dropped_frac == 0).all()
