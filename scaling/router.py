"""MoE routers: which experts see which tokens, with what weight, and the router's own losses and statistics.

A router maps the tokens of one MoE layer [n, d] to a ``Routing``: the kept (token, expert) pairs grouped by expert
(``token``, ``gate``, ``counts``: what the grouped experts of ``scaling.model`` consume), the load-balancing and
z losses, and ``RouterStats`` by name. It never runs an expert. As in torchtitan's MoE, scoring and selection
(the router), the token reordering (``reorder``: sort by expert, drop beyond capacity) and the grouped experts are
separate pieces; a token-choice router scores, picks its top k (``top_k``) and hands them to
``Router.token_choice``, which reorders them and adds the losses and statistics.

Adding a router: a ``Router`` subclass here and its name in ``config.ROUTERS`` (the model's ``router`` value).
Its parameters must be those ``flops.router_params`` counts (``tests/test_model.py`` checks every router).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaling.config import ROUTERS, ModelConfig


class RouterStats(NamedTuple):
    """One MoE layer's routing in one forward pass (detached). A vector field has one value per expert, a scalar one
    per layer; the names are the run files' and the store's columns (``runfiles.ROUTER_STATS``)."""

    load: Tensor  # [E] fraction of token-expert assignments routed to each expert (sums to 1)
    entropy: Tensor  # mean entropy of the router distribution over tokens (nats)
    dropped_frac: Tensor  # fraction of assignments dropped by the capacity limit


class Routing(NamedTuple):
    """A router's decision for n tokens: m kept (token, expert) pairs, grouped by expert in expert order."""

    token: Tensor  # [m] the token of each pair
    gate: Tensor  # [m] the weight of its expert's output (float32)
    counts: Tensor  # [E] pairs per expert (so expert e's pairs are rows counts[:e].sum() onwards)
    aux_loss: Tensor  # load-balancing loss, coefficient applied
    z_loss: Tensor  # router z-loss, coefficient applied
    stats: RouterStats


class Router(nn.Module):
    """Base class: a bias-free gate x·W_rᵀ [n, E] (``gate``) and, with ``router_noise``, the noisy top-k projection
    (Shazeer et al. 2017, ``noise``). Subclasses turn the logits into a ``Routing`` in ``forward``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.noise = nn.Linear(cfg.d_model, cfg.n_experts, bias=False) if cfg.router_noise else None

    def forward(self, x: Tensor) -> Routing:
        """Route ``x`` [n, d]."""
        raise NotImplementedError

    def logits(self, x: Tensor) -> Tensor:
        """Gate logits [n, E] in float32."""
        return self.gate(x).float()

    def perturb(self, x: Tensor, logits: Tensor) -> Tensor | None:
        """Noisy top-k: logits + N(0, 1)·softplus(x·W_noise) while training; None without noise."""
        if self.noise is None or not self.training:
            return None
        return logits + torch.randn_like(logits) * F.softplus(self.noise(x).float())

    def z_loss(self, lse: Tensor) -> Tensor:
        """ST-MoE router z-loss (Zoph et al. 2022): β·mean(logsumexp(logits)²), from [n, 1] logsumexps."""
        return self.cfg.z_loss_coef * lse.square().mean()

    def balance_loss(self, load: Tensor, probs: Tensor) -> Tensor:
        """Switch load-balancing loss (Fedus et al. 2021): α·E·Σ_i f_i·P_i, f = ``load`` [E], P = mean ``probs``."""
        return self.cfg.aux_loss_coef * self.cfg.n_experts * (load * probs.mean(0)).sum()

    def token_choice(self, chosen: Tensor, gates: Tensor, probs: Tensor, log_probs: Tensor, lse: Tensor) -> Routing:
        """The ``Routing`` of a token-choice router from its choices and gates [n, k], the distribution over experts
        it balances and reports (``probs``, ``log_probs`` [n, E]) and its logits' logsumexps ``lse`` [n, 1]."""
        cfg = self.cfg
        token, gate, kept, counts = reorder(chosen, gates, cfg.n_experts, cfg.capacity_factor)
        pairs = chosen.numel()
        load = counts.float() / pairs
        with torch.no_grad():
            stats = RouterStats(load=load, entropy=-(probs * log_probs).sum(-1).mean(),
                                dropped_frac=1 - kept.sum() / pairs)
        return Routing(token, gate, kept, self.balance_loss(load, probs), self.z_loss(lse), stats)


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Gates and chosen experts [n, k] of the k highest ``scores`` per token; with k > 1 the gates are renormalised
    over the chosen k (Mixtral), with k = 1 the token keeps its score (Switch) so that the router gets a gradient."""
    gates, chosen = scores.max(-1, keepdim=True) if k == 1 else scores.topk(k, dim=-1)
    if k > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    return gates, chosen


def reorder(chosen: Tensor, gates: Tensor, n_experts: int, capacity_factor: float
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Token reordering of a token-choice router: the (token, expert) pairs of ``chosen`` [n, k] grouped by expert,
    in slot-major order (every token's first choice before any second choice), so that a capacity of
    ceil(capacity_factor·n·k/E) pairs per expert (``capacity_factor > 0``) drops later choices first.

    Returns:
        token, gate [m]: the kept pairs' tokens and gates, grouped by expert; kept [E]: pairs kept per expert;
        counts [E]: pairs chosen per expert, before dropping.
    """
    n_tokens, k = chosen.shape
    flat = chosen.t().reshape(-1)  # [k·n] slot-major
    counts = torch.bincount(flat, minlength=n_experts)
    order = flat.argsort(stable=True)
    token, gate = order % n_tokens if k > 1 else order, gates.t().reshape(-1)[order]
    kept = counts
    if capacity_factor > 0:
        capacity = math.ceil(capacity_factor * n_tokens * k / n_experts)
        rank = torch.arange(flat.numel(), device=chosen.device) - (counts.cumsum(0) - counts)[flat[order]]
        keep = rank < capacity
        token, gate, kept = token[keep], gate[keep], counts.clamp(max=capacity)
    return token, gate, kept, counts


class SoftmaxTopK(Router):
    """Token choice over softmax probabilities (Shazeer et al. 2017; Switch, Fedus et al. 2021), optionally noisy.

    probs = softmax(logits + noise); each token takes its top-k experts; the balancing loss and the entropy use
    these (noisy) probabilities, the z-loss the clean logits."""

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        lse = logits.logsumexp(-1, keepdim=True)  # also the z-loss's
        noisy = self.perturb(x, logits)
        noisy, noisy_lse = (logits, lse) if noisy is None else (noisy, noisy.logsumexp(-1, keepdim=True))
        log_probs = noisy - noisy_lse  # log_softmax: its CPU kernel is 3x slower for E ≤ 8 (measured)
        probs = log_probs.exp()
        gates, chosen = top_k(probs, self.cfg.top_k)
        return self.token_choice(chosen, gates, probs, log_probs, lse)


class SigmoidTopK(Router):
    """Token choice over independent sigmoid scores (DeepSeek-V3, DeepSeek-AI 2024, without its bias-based
    balancing): s = sigmoid(logits + noise), each token takes its top-k experts by s, gated by s renormalised over
    the k (k = 1 keeps s). Balancing loss and entropy use the scores normalised over all experts, s / Σ s (as
    DeepSeek-V3's balance loss does); the z-loss is the clean logits' (ST-MoE)."""

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        noisy = self.perturb(x, logits)
        scores = (logits if noisy is None else noisy).sigmoid()
        probs = scores / scores.sum(-1, keepdim=True)
        gates, chosen = top_k(scores, self.cfg.top_k)
        return self.token_choice(chosen, gates, probs, probs.log(), logits.logsumexp(-1, keepdim=True))


def make_router(cfg: ModelConfig) -> Router:
    """The router ``cfg.router`` names (``config.ROUTERS``)."""
    return globals()[ROUTERS[cfg.router]](cfg)
