"""The transformer: parameter counts against flops.py, MoE dispatch and routers against per-token references (and
the MoE layer as it was before routers were modules, bit for bit), sharing."""

import math

import pytest
import torch
import torch.nn.functional as F

from scaling import router as routers
from scaling.config import ROUTERS, ConfigError, ModelConfig
from scaling.flops import param_counts
from scaling.model import Attention, MoE, Transformer, batched_attention_wins, batched_causal_attention
from scaling.router import Router, RouterStats, Routing

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
    "sigmoid_router": dict(n_experts=8, top_k=2, router="sigmoid-topk", router_noise=True),
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


SCORES = {"softmax-topk": lambda logits: logits.softmax(-1),  # what each router ranks and gates by
          "sigmoid-topk": lambda logits: logits.sigmoid()}


def reference_moe(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-token, per-choice loop (eval mode): the definition the batched dispatch must reproduce."""
    cfg, experts = moe.router.cfg, moe.experts
    probs = SCORES[cfg.router](x @ moe.router.gate.weight.T)
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


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("overrides", [dict(top_k=1), dict(top_k=2), dict(top_k=2, shared_experts=1),
                                       dict(top_k=1, capacity_factor=0.5),
                                       dict(top_k=2, capacity_factor=0.75)])
def test_moe_dispatch_matches_reference(overrides, router):
    torch.manual_seed(0)
    cfg = config(n_experts=4, router=router, **overrides)
    moe = Transformer(cfg).blocks[0].ffn.eval()
    x = torch.randn(2, 24, cfg.d_model)
    with torch.no_grad():
        moe.router.gate.weight.mul_(30)  # confident, unbalanced routing so that capacity matters
        y, out = moe(x)
    expected, dropped = reference_moe(moe, x.view(-1, cfg.d_model))
    torch.testing.assert_close(y.view(-1, cfg.d_model), expected, atol=1e-5, rtol=1e-4)
    assert out.stats.dropped_frac.item() == pytest.approx(dropped)
    assert (dropped > 0) == (cfg.capacity_factor > 0)
    assert out.stats.load.sum().item() == pytest.approx(1.0)
    assert 0 <= out.stats.entropy.item() <= math.log(cfg.n_experts)


def test_moe_losses():
    torch.manual_seed(0)
    cfg = config(n_experts=4, top_k=2)
    moe = Transformer(cfg).blocks[0].ffn
    x = torch.randn(64, cfg.d_model)
    _, out = moe(x)
    logits = x @ moe.router.gate.weight.T
    load = out.stats.load
    expected_load = torch.bincount(logits.topk(2).indices.flatten(), minlength=4) / 128
    torch.testing.assert_close(load, expected_load)
    aux = cfg.aux_loss_coef * 4 * (load * logits.softmax(-1).mean(0)).sum()
    assert out.aux_loss.item() == pytest.approx(aux.item())
    z = cfg.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    assert out.z_loss.item() == pytest.approx(z.item())


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_terms_match_log_softmax_definition(top_k):
    """The router's log-probabilities (logits − logsumexp) and top-1 choice (max) give the entropy, the
    balancing and z losses and their router gradients of the log_softmax / topk definition."""
    torch.manual_seed(0)
    cfg = config(n_experts=8, top_k=top_k)
    moe = Transformer(cfg).blocks[0].ffn
    x = torch.randn(96, cfg.d_model)
    _, out = moe(x)
    got = torch.autograd.grad(out.aux_loss + out.z_loss, moe.router.gate.weight)[0]
    logits = x @ moe.router.gate.weight.T
    log_probs = logits.log_softmax(-1)
    chosen = log_probs.topk(top_k).indices.flatten()
    load = torch.bincount(chosen, minlength=8) / chosen.numel()
    aux = cfg.aux_loss_coef * 8 * (load * log_probs.exp().mean(0)).sum()
    z = cfg.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    want = torch.autograd.grad(aux + z, moe.router.gate.weight)[0]
    torch.testing.assert_close(out.stats.load, load)
    torch.testing.assert_close(out.aux_loss, aux.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    torch.testing.assert_close(out.stats.entropy, entropy.detach(), rtol=1e-6, atol=0)
    assert not out.stats.entropy.requires_grad


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_gradients_match_reference(top_k, router):
    torch.manual_seed(0)
    moe = Transformer(config(n_experts=4, top_k=top_k, shared_experts=1, router=router)).blocks[0].ffn.eval()
    x = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(40, 32)
    params = [x, moe.router.gate.weight, moe.experts.w1, moe.experts.w2, moe.experts.shared.fc.weight]
    grads = torch.autograd.grad((moe(x)[0] * weight).sum(), params)
    expected = torch.autograd.grad((reference_moe(moe, x)[0] * weight).sum(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("router", ROUTERS)
def test_router_noise_only_in_training(router):
    torch.manual_seed(0)
    moe = Transformer(config(n_experts=4, router_noise=True, router=router)).blocks[0].ffn
    x = torch.randn(32, 32)
    moe.eval()
    assert torch.equal(moe(x)[0], moe(x)[0])
    moe.train()
    assert not torch.equal(moe(x)[0], moe(x)[0])


def test_sigmoid_router_terms():
    """DeepSeek-V3's scores without bias balancing: top-k of sigmoid(logits), gates renormalised over the k; the
    balancing loss and entropy over s / Σ s; the z-loss of the logits."""
    torch.manual_seed(0)
    cfg = config(n_experts=8, top_k=2, router="sigmoid-topk")
    moe = Transformer(cfg).blocks[0].ffn
    x = torch.randn(96, cfg.d_model)
    _, out = moe(x)
    logits = x @ moe.router.gate.weight.T
    scores = logits.sigmoid()
    chosen = scores.topk(2).indices.flatten()
    load = torch.bincount(chosen, minlength=8) / chosen.numel()
    probs = scores / scores.sum(-1, keepdim=True)
    torch.testing.assert_close(out.stats.load, load)
    torch.testing.assert_close(out.aux_loss, cfg.aux_loss_coef * 8 * (load * probs.mean(0)).sum())
    torch.testing.assert_close(out.z_loss, cfg.z_loss_coef * torch.logsumexp(logits, -1).square().mean())
    torch.testing.assert_close(out.stats.entropy, -(probs * probs.log()).sum(-1).mean())
    gates = out.gate.view(-1)
    assert gates.min() > 0 and torch.bincount(out.token, weights=gates).allclose(torch.ones(96))  # sum to 1


def moe_as_before(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
    """``MoE.forward`` as it was before routers were modules of their own (softmax top-k inline, op for op): the
    definition the default router must reproduce bit for bit, so that stored runs mean what they meant."""
    cfg, shape = moe.router.cfg, x.shape
    x = x.reshape(-1, shape[-1])
    n_tokens, E, k = x.shape[0], cfg.n_experts, cfg.top_k
    logits = moe.router.gate(x).float()
    lse = logits.logsumexp(-1, keepdim=True)
    noisy, noisy_lse = logits, lse
    if moe.router.noise is not None and moe.training:
        noisy = logits + torch.randn_like(logits) * F.softplus(moe.router.noise(x).float())
        noisy_lse = noisy.logsumexp(-1, keepdim=True)
    log_probs = noisy - noisy_lse
    probs = log_probs.exp()
    gates, chosen = probs.max(-1, keepdim=True) if k == 1 else probs.topk(k, dim=-1)
    if k > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    flat = chosen.t().reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    order = flat.argsort(stable=True)
    token, gate = order % n_tokens if k > 1 else order, gates.t().reshape(-1)[order]
    kept = counts
    if cfg.capacity_factor > 0:
        capacity = math.ceil(cfg.capacity_factor * n_tokens * k / E)
        rank = torch.arange(flat.numel(), device=x.device) - (counts.cumsum(0) - counts)[flat[order]]
        keep = rank < capacity
        token, gate, kept = token[keep], gate[keep], counts.clamp(max=capacity)
    out = moe.experts(x.index_select(0, token), kept.cumsum(0).to(torch.int32))
    out = out * gate.to(x.dtype)[:, None]
    y = torch.zeros_like(x).index_add_(0, token, out)
    if moe.experts.shared is not None:
        y = y + moe.experts.shared(x)
    load = counts.float() / flat.numel()
    aux_loss = cfg.aux_loss_coef * E * (load * probs.mean(0)).sum()
    z_loss = cfg.z_loss_coef * lse.square().mean()
    with torch.no_grad():
        stats = RouterStats(load, -(probs * log_probs).sum(-1).mean(), 1 - kept.sum() / flat.numel())
    return y.view(shape), Routing(token, gate, kept, aux_loss, z_loss, stats)


@pytest.mark.parametrize("name", ["moe", "router_noise", "shared_experts", "granularity2", "everything"])
def test_default_router_is_bit_identical_to_before(name, monkeypatch):
    """Loss, aux and z losses, router statistics and every gradient of a training forward pass equal those of the
    MoE layer before routers were modules (same seed, noise included), exactly."""
    cfg = config(**VARIANTS[name])
    x, y = torch.randint(0, 256, (2, 3, 16))

    def step() -> tuple:
        torch.manual_seed(0)
        model = Transformer(cfg)
        _, loss, aux = model(x, y)
        grads = torch.autograd.grad(loss + aux["aux_loss"] + aux["z_loss"], list(model.parameters()))
        return loss, aux["aux_loss"], aux["z_loss"], *[t for s in aux["router"] for t in s], *grads

    now = step()
    monkeypatch.setattr(MoE, "forward", moe_as_before)
    before = step()
    assert len(now) == len(before) and all(torch.equal(a, b) for a, b in zip(now, before, strict=True))


def test_parameters_saved_before_routers_were_modules_load():
    """Checkpoints name the gate ``ffn.router.weight`` and the noise projection ``ffn.noise.weight``."""
    cfg = config(**VARIANTS["everything"])
    torch.manual_seed(0)
    saved = Transformer(cfg).state_dict()
    old = {k.replace("router.gate.", "router.").replace("router.noise.", "noise."): v for k, v in saved.items()}
    assert "blocks.1.ffn.noise.weight" in old and "blocks.1.ffn.router.weight" in old
    model = Transformer(cfg)
    model.load_state_dict(old)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_router_registry():
    """Every name of ``config.ROUTERS`` builds its ``Router``; an unknown name is one clear error."""
    for name in ROUTERS:
        moe = Transformer(config(n_experts=4, router=name)).blocks[0].ffn
        assert isinstance(moe.router, Router) and type(moe.router).__name__ == ROUTERS[name]
        assert type(moe.router).forward is not Router.forward
    assert ModelConfig().router == "softmax-topk"  # today's router is the default
    with pytest.raises(ConfigError, match="model.router must be one of softmax-topk, sigmoid-topk, got 'sigmoid'"
                                          " \\(did you mean 'sigmoid-topk'\\?\\)"):
        ModelConfig(router="sigmoid")
    assert routers.make_router(config(n_experts=4, router="sigmoid-topk")).cfg.router == "sigmoid-topk"


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
