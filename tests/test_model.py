"""The transformer: parameter counts against flops.py, MoE dispatch against a per-token reference, sharing."""

import math

import pytest
import torch
import torch.nn.functional as F

from scaling.config import ModelConfig
from scaling.flops import param_counts
from scaling.model import Attention, MoE, Transformer, batched_attention_wins, batched_causal_attention

BASE = dict(vocab_size=256, context=16, d_model=32, n_layers=2, n_heads=2, d_ff=128)
VARIANTS = {
    "dense": {},
    "moe": dict(n_experts=4, top_k=2),
    "untied": dict(tie_embeddings=False),
    "rotary": dict(positional="rotary", n_experts=4),
    "shared_experts": dict(n_experts=4, shared_experts=2),
    "granularity2": dict(n_experts=8, top_k=2, granularity=2),
    "moe_every2": dict(n_experts=4, moe_every=2, n_layers=4),
    "share_weights": dict(n_experts=4, share_weights=True, n_layers=3),
    "share_dense_and_moe": dict(n_experts=4, share_weights=True, moe_every=2, n_layers=4, shared_experts=1),
    "share_dense": dict(share_weights=True, n_layers=3),
    "router_noise": dict(n_experts=4, router_noise=True),
    "everything": dict(n_experts=8, top_k=2, granularity=2, shared_experts=1, moe_every=2, n_layers=4,
                       share_weights=True, router_noise=True, positional="rotary", tie_embeddings=False,
                       capacity_factor=1.25),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and immune to other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


@pytest.mark.parametrize("name", VARIANTS)
def test_param_counts_match_flops(name):
    cfg = config(**VARIANTS[name])
    model = Transformer(cfg)
    counts = param_counts(cfg)
    assert model.num_params() == sum(p.numel() for p in model.parameters()) == counts.total
    assert model.active_params() == counts.active


def test_layer_structure():
    model = Transformer(config(n_experts=4, share_weights=True, n_layers=3))
    blocks = model.blocks
    assert all(b.attn is blocks[0].attn and b.ffn.experts is blocks[0].ffn.experts for b in blocks)
    assert len({id(b.ffn.router) for b in blocks}) == 3 and len({id(b.ln1) for b in blocks}) == 3
    for p in model.parameters():
        assert p.dim() >= 2 or p.shape == (32,)  # no Linear biases: only LayerNorm vectors are 1-d
    assert model.head.weight is model.tok.weight
    block = model.blocks[0]
    residual = torch.cat([block.attn.proj.weight.flatten(), block.ffn.experts.w2.flatten()])
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.1)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)


def reference_moe(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-token, per-choice loop (eval mode): the definition the batched dispatch must reproduce."""
    cfg, experts = moe.cfg, moe.experts
    probs = (x @ moe.router.weight.T).softmax(-1)
    gates, chosen = probs.topk(cfg.top_k, dim=-1)
    if cfg.top_k > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    capacity = math.ceil(cfg.capacity_factor * len(x) * cfg.top_k / cfg.n_experts) or None
    used = [0] * cfg.n_experts
    dropped = 0
    for j in range(cfg.top_k):  # every token's first choice has priority over any second choice
        for t in range(len(x)):
            e = int(chosen[t, j])
            if capacity is not None and used[e] >= capacity:
                dropped += 1
                continue
            used[e] += 1
            y[t] += gates[t, j] * (F.gelu(x[t] @ experts.w1[e], approximate="tanh") @ experts.w2[e])
    if experts.shared is not None:
        y += experts.shared(x)
    return y, dropped / (len(x) * cfg.top_k)


@pytest.mark.parametrize("overrides", [dict(top_k=1), dict(top_k=2), dict(top_k=2, shared_experts=1),
                                       dict(top_k=1, capacity_factor=0.5),
                                       dict(top_k=2, capacity_factor=0.75)])
def test_moe_dispatch_matches_reference(overrides):
    torch.manual_seed(0)
    cfg = config(n_experts=4, **overrides)
    moe = Transformer(cfg).blocks[0].ffn.eval()
    x = torch.randn(2, 24, cfg.d_model)
    with torch.no_grad():
        moe.router.weight.mul_(30)  # confident, unbalanced routing so that capacity matters
        y, out = moe(x)
    expected, dropped = reference_moe(moe, x.view(-1, cfg.d_model))
    torch.testing.assert_close(y.view(-1, cfg.d_model), expected, atol=1e-5, rtol=1e-4)
    assert out.stats.dropped.item() == pytest.approx(dropped)
    assert (dropped > 0) == (cfg.capacity_factor > 0)
    assert out.stats.load.sum().item() == pytest.approx(1.0)
    assert 0 <= out.stats.entropy.item() <= math.log(cfg.n_experts)


def test_moe_losses():
    torch.manual_seed(0)
    cfg = config(n_experts=4, top_k=2)
    moe = Transformer(cfg).blocks[0].ffn
    x = torch.randn(64, cfg.d_model)
    _, out = moe(x)
    logits = x @ moe.router.weight.T
    load = out.stats.load
    expected_load = torch.bincount(logits.topk(2).indices.flatten(), minlength=4) / 128
    torch.testing.assert_close(load, expected_load)
    aux = cfg.aux_loss_coef * 4 * (load * logits.softmax(-1).mean(0)).sum()
    assert out.aux_loss.item() == pytest.approx(aux.item())
    z = cfg.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    assert out.z_loss.item() == pytest.approx(z.item())


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_gradients_match_reference(top_k):
    torch.manual_seed(0)
    moe = Transformer(config(n_experts=4, top_k=top_k, shared_experts=1)).blocks[0].ffn.eval()
    x = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(40, 32)
    params = [x, moe.router.weight, moe.experts.w1, moe.experts.w2, moe.experts.shared.fc.weight]
    grads = torch.autograd.grad((moe(x)[0] * weight).sum(), params)
    expected = torch.autograd.grad((reference_moe(moe, x)[0] * weight).sum(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_router_noise_only_in_training():
    torch.manual_seed(0)
    moe = Transformer(config(n_experts=4, router_noise=True)).blocks[0].ffn
    x = torch.randn(32, 32)
    moe.eval()
    assert torch.equal(moe(x)[0], moe(x)[0])
    moe.train()
    assert not torch.equal(moe(x)[0], moe(x)[0])


@pytest.mark.parametrize("name", ["dense", "moe", "rotary", "share_weights"])
def test_causal_and_per_token_losses(name):
    torch.manual_seed(0)
    cfg = config(**VARIANTS[name])
    model = Transformer(cfg).eval()
    x = torch.randint(0, 256, (2, 16))
    y = torch.randint(0, 256, (2, 16))
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        logits, loss, aux = model(x, y)
        logits2, per_token, _ = model(changed, y, reduction="none")
    torch.testing.assert_close(logits[:, :10], logits2[:, :10])
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])
    with torch.no_grad():
        per_token = model(x, y, reduction="none")[1]
    assert per_token.shape == (2, 16) and per_token.mean().item() == pytest.approx(loss.item(), rel=1e-6)
    assert len(aux["router"]) == cfg.n_moe_layers
    assert aux["aux_loss"].shape == () and torch.isfinite(aux["aux_loss"] + aux["z_loss"])


@pytest.mark.parametrize("T,head_dim", [(1, 4), (20, 4), (64, 4), (100, 8), (64, 16)])
def test_batched_attention_matches_sdpa(T, head_dim):
    """Forward and all input gradients equal SDPA's within float32 tolerance, for T within, at and across
    query blocks."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, T, head_dim, requires_grad=True) for _ in range(3))
    grad = torch.randn(6, T, head_dim)
    ours = batched_causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_attention_paths_agree(positional):
    """The module's batched path (chosen for head size 4) and its SDPA path give the same output and weight
    gradients."""
    cfg = ModelConfig(**{**BASE, "context": 40, "n_heads": 8, "positional": positional})
    torch.manual_seed(0)
    model = Transformer(cfg)
    assert all(m.batched for m in model.modules() if isinstance(m, Attention))
    x = torch.randint(0, cfg.vocab_size, (3, cfg.context))
    results = []
    for batched in (True, False):
        for m in model.modules():
            if isinstance(m, Attention):
                m.batched = batched
        _, loss, _ = model(x, x)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_batched_attention_rule():
    assert batched_attention_wins(context=64, head_dim=4, n_heads=4)
    assert not batched_attention_wins(context=64, head_dim=16, n_heads=8)  # SDPA's kernel wins
    assert not batched_attention_wins(context=64, head_dim=4, n_heads=2)
    assert not batched_attention_wins(context=512, head_dim=4, n_heads=8)
