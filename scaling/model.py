"""The transformer: pre-LayerNorm decoder with dense or Mixture-of-Experts FFNs and optional weight sharing.

Parameter counts match ``scaling.flops.param_counts`` exactly (a test checks every option). Dense is the
``n_experts == 1`` case. An MoE FFN asks its router (``scaling.router``: scores, top-k, capacity, the
load-balancing and z losses) for the token-expert pairs grouped by expert, gathers them, runs them through one
grouped matmul per projection and scatter-adds them back weighted by their gates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaling.config import ConfigError, ModelConfig
from scaling.router import Routing, make_router

QUERY_BLOCK = 32  # query rows per block of the batched causal path


def batched_attention_wins(context: int, head_dim: int, n_heads: int) -> bool:
    """Whether ``batched_causal_attention`` beats SDPA's CPU flash kernel (forward + backward, float32, one
    thread, batch 16), as measured by ``benchmarks/sweep_throughput.py`` (both paths, every demo shape). Attention
    alone was 1.1-1.4x faster at head sizes 4 and 8 for T = 64-256 and 0.75-0.9x as fast at head size 16, where
    the flash kernel's work is no longer dominated by its per-block overhead; whole training steps of the demo
    family were up to 1.12x faster, except with 2 heads (d_model 8), where the extra copies cost more (0.9x).
    Beyond T = 256 the scores of a block no longer fit in cache.
    """
    return head_dim <= 8 and n_heads >= 3 and context <= 256


def batched_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax(q·kᵀ/√d)·v for [B·H, T, d] inputs: one baddbmm, softmax and bmm over all heads per block
    of ``QUERY_BLOCK`` queries, each against only the keys it can see (the masked upper triangle beyond the
    block is never computed)."""
    T, d = q.shape[1], q.shape[2]
    mask = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu_(1)
    out = []
    for start in range(0, T, QUERY_BLOCK):
        end = min(T, start + QUERY_BLOCK)
        scores = torch.baddbmm(mask[start:end, :end], q[:, start:end], k[:, :end].transpose(1, 2), alpha=d**-0.5)
        out.append(torch.bmm(scores.softmax(-1), v[:, :end]))  # [B·H, block, d]
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


class Attention(nn.Module):
    """Causal multi-head self-attention with a fused bias-free QKV projection.

    On CPU, small head sizes take ``batched_causal_attention`` (``batched_attention_wins``), else SDPA;
    ``batched`` may be set to force a path (the throughput benchmark compares both)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.batched = batched_attention_wins(cfg.context, cfg.head_dim, cfg.n_heads)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        B, T, C = x.shape
        H = self.n_heads
        qkv = self.qkv(x).view(B, T, 3, H, C // H)
        if self.batched and not x.is_cuda:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, B * H, T, C // H).unbind(0)  # one copy
            if rope is not None:
                q, k = rotate(q, *rope), rotate(k, *rope)
            y = batched_causal_attention(q, k, v).view(B, H, T, C // H)
        else:
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, T, head_dim] views: no copies
            if rope is not None:
                q, k = rotate(q, *rope), rotate(k, *rope)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def rotary_tables(context: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin [context, head_dim / 2] of rotary position embeddings (Su et al. 2021)."""
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i + d/2}) of the last dimension by position-dependent angles (NeoX layout)."""
    T = x.shape[-2]
    cos, sin = cos[:T], sin[:T]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class MLP(nn.Module):
    """Bias-free GELU MLP d -> width -> d (GPT-2's tanh approximation of GELU: faster on CPU)."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, width, bias=False)
        self.proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Experts(nn.Module):
    """E routed experts of width d_expert as stacked weights, plus the always-on shared experts (one MLP of
    width shared_experts·d_expert: the parameter count of that many separate experts). Shareable by layers."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_expert))
        self.w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_expert, cfg.d_model))
        self.shared = MLP(cfg.d_model, cfg.shared_experts * cfg.d_expert) if cfg.shared_experts else None

    def forward(self, x: Tensor, offsets: Tensor) -> Tensor:
        """Rows of ``x`` grouped by expert; ``offsets`` [E] int32 are the cumulative row counts per expert."""
        dtype = torch.bfloat16 if x.is_cuda else x.dtype  # CUDA grouped GEMMs take bf16 only
        h = F.gelu(F.grouped_mm(x.to(dtype), self.w1.to(dtype), offs=offsets), approximate="tanh")
        return F.grouped_mm(h, self.w2.to(dtype), offs=offsets).to(x.dtype)


class MoE(nn.Module):
    """Routed FFN: its own router (``scaling.router``) over a (possibly shared) expert bank; dropless unless the
    router drops pairs beyond a capacity."""

    def __init__(self, cfg: ModelConfig, experts: Experts) -> None:
        super().__init__()
        self.router = make_router(cfg)
        self.experts = experts
        self.register_load_state_dict_pre_hook(rename_router_keys)

    def forward(self, x: Tensor) -> tuple[Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [n, d]
        route = self.router(x)
        out = self.experts(x.index_select(0, route.token), route.counts.cumsum(0).to(torch.int32))  # [m, d]
        out = out * route.gate.to(x.dtype)[:, None]
        y = torch.zeros_like(x).index_add_(0, route.token, out)
        if self.experts.shared is not None:
            y = y + self.experts.shared(x)
        return y.view(shape), route


def rename_router_keys(module: MoE, state_dict: dict, prefix: str, *args: object) -> None:
    """Checkpoints written before routers were modules of their own keep loading: ``router.weight`` is now
    ``router.gate.weight`` and ``noise.weight`` is ``router.noise.weight``."""
    for old, new in (("router.weight", "router.gate.weight"), ("noise.weight", "router.noise.weight")):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + ffn(ln2(x)); attn and ffn may be shared modules."""

    def __init__(self, cfg: ModelConfig, attn: Attention, ffn: MLP | MoE) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = attn
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = ffn

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Routing | None]:
        x = x + self.attn(self.ln1(x), rope)
        if isinstance(self.ffn, MoE):
            h, moe = self.ffn(self.ln2(x))
            return x + h, moe
        return x + self.ffn(self.ln2(x)), None


class Transformer(nn.Module):
    """Decoder-only language model for ``ModelConfig``; dense when ``n_experts == 1``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model) if cfg.positional == "learned" else None
        share = cfg.share_weights
        attn = Attention(cfg) if share else None
        mlp = MLP(cfg.d_model, cfg.d_ff) if share and cfg.n_moe_layers < cfg.n_layers else None
        bank = Experts(cfg) if share and cfg.n_moe_layers else None
        blocks = []
        for i in range(cfg.n_layers):
            if cfg.is_moe_layer(i):
                ffn = MoE(cfg, bank if share else Experts(cfg))
            else:
                ffn = mlp if share else MLP(cfg.d_model, cfg.d_ff)
            blocks.append(Block(cfg, attn if share else Attention(cfg), ffn))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight
        if cfg.positional == "rotary":
            if cfg.head_dim % 2:
                raise ConfigError(f"rotary positions need an even head size, got {cfg.head_dim}")
            cos, sin = rotary_tables(cfg.context, cfg.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """normal(0, 0.02); residual projections scaled by 1/sqrt(2·n_layers) (GPT-2); LayerNorms 1 and 0."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue  # LayerNorm weight and bias keep their (1, 0) init
            residual = name.endswith(("proj.weight", "w2"))
            nn.init.normal_(p, 0.0, residual_std if residual else 0.02)

    def num_params(self) -> int:
        """Unique parameters (shared and tied weights once), as ``flops.param_counts(cfg).total``."""
        return sum(p.numel() for p in self.parameters())

    def active_params(self) -> int:
        """Parameters one token touches: all but the E − k routed experts it skips in each unique bank."""
        banks = {id(m): m for m in self.modules() if isinstance(m, Experts)}.values()
        skipped = self.cfg.n_experts - self.cfg.top_k
        idle = sum((m.w1.numel() + m.w2.numel()) * skipped // self.cfg.n_experts for m in banks)
        return self.num_params() - idle

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                reduction: str = "mean") -> tuple[Tensor, Tensor | None, dict]:
        """Logits [B, T, V], the cross-entropy (mean, or per token [B, T] with ``reduction="none"``) when
        ``targets`` are given, and aux: {"aux_loss", "z_loss" (sums over MoE layers),
        "router": [router.RouterStats per MoE layer]}."""
        T = idx.shape[1]
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos.weight[:T]
        rope = (self.rope_cos, self.rope_sin) if self.cfg.positional == "rotary" else None
        moe = []
        for block in self.blocks:
            x, out = block(x, rope)
            if out is not None:
                moe.append(out)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)
            loss = loss.view(targets.shape) if reduction == "none" else loss
        zero = logits.new_zeros((), dtype=torch.float32)
        aux = {"aux_loss": sum((m.aux_loss for m in moe), zero), "z_loss": sum((m.z_loss for m in moe), zero),
               "router": [m.stats for m in moe]}
        return logits, loss, aux
