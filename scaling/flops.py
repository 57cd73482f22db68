"""Parameter and FLOP accounting for dense and MoE transformers (exact for ``scaling.model``).

Conventions:
- Parameters: every weight of the instantiated module, counted once even when shared across layers (WideNet /
  ALBERT sharing). Embedding params = token embedding + learned positions + untied unembedding. Pearce & Song
  2024 and Porian et al. 2024 recommend fitting laws on TOTAL params, unembedding included.
- Active params: those a token touches in one forward pass: k routed experts (+ shared experts) per MoE layer,
  the router (and its noise projection), attention, norms and embeddings.
- Forward FLOPs per token (Chinchilla, Hoffmann et al. 2022, Appendix F): 2 FLOPs per multiply-add for every
  matmul, attention logits and value reduction over the full context (2·n_ctx·d each, not halved for the causal
  mask), router 2·d·E per MoE layer, the unembedding 2·d·V; norms, softmax and embeddings ignored. Shared
  weights cost FLOPs in every layer that applies them. Training = 3 × forward (backward ≈ 2 × forward).
- ``flops_6nd`` = 6·N_active·D (Kaplan et al. 2020 / Chinchilla), kept beside the exact count.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaling.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int
    embedding: int
    non_embedding: int
    active_non_embedding: int


def embedding_params(cfg: ModelConfig) -> int:
    positions = cfg.context * cfg.d_model if cfg.positional == "learned" else 0
    unembed = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return cfg.vocab_size * cfg.d_model + positions + unembed


def attention_params(cfg: ModelConfig) -> int:
    """Q, K, V and output projections without biases: 4·d²."""
    return 4 * cfg.d_model * cfg.d_model


def mlp_params(d_model: int, width: int) -> int:
    """Two bias-free projections d -> width -> d."""
    return 2 * d_model * width


def router_params(cfg: ModelConfig) -> int:
    """Router logits d·E, plus the noisy top-k projection d·E (Shazeer et al. 2017) when enabled: the same for every
    router of ``scaling.router`` (softmax or sigmoid scores cost no counted FLOPs); one with other weights adds its
    case here (``tests/test_model.py`` checks the count of every router)."""
    return cfg.d_model * cfg.n_experts * (2 if cfg.router_noise else 1)


def expert_params(cfg: ModelConfig, active: bool) -> int:
    """Routed experts (all E, or the k a token uses) plus always-on shared experts, of width d_ff / G."""
    n = (cfg.top_k if active else cfg.n_experts) + cfg.shared_experts
    return n * mlp_params(cfg.d_model, cfg.d_expert)


def layernorm_params(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Total, active, embedding and non-embedding parameter counts, exactly as ``scaling.model`` builds them."""
    n_moe = cfg.n_moe_layers
    n_dense = cfg.n_layers - n_moe
    per_layer_norms = 2 * layernorm_params(cfg) * cfg.n_layers + layernorm_params(cfg)
    routers = router_params(cfg) * n_moe
    copies = 1 if cfg.share_weights else cfg.n_layers
    attn = attention_params(cfg) * copies
    dense_ffn = mlp_params(cfg.d_model, cfg.d_ff) * (min(n_dense, 1) if cfg.share_weights else n_dense)
    moe_copies = min(n_moe, 1) if cfg.share_weights else n_moe
    experts_total = expert_params(cfg, active=False) * moe_copies
    experts_active = expert_params(cfg, active=True) * moe_copies
    emb = embedding_params(cfg)
    common = per_layer_norms + routers + attn + dense_ffn
    total_ne = common + experts_total
    active_ne = common + experts_active
    return ParamCounts(
        total=emb + total_ne,
        active=emb + active_ne,
        embedding=emb,
        non_embedding=total_ne,
        active_non_embedding=active_ne,
    )


def forward_flops_per_token(cfg: ModelConfig) -> float:
    """Exact forward FLOPs per token (Chinchilla Appendix F convention; see module docstring)."""
    d = cfg.d_model
    attn = 2 * attention_params(cfg) + 2 * 2 * cfg.context * d
    dense_ffn = 2 * mlp_params(d, cfg.d_ff)
    moe_ffn = 2 * router_params(cfg) + 2 * expert_params(cfg, active=True)
    n_moe = cfg.n_moe_layers
    layers = cfg.n_layers * attn + n_moe * moe_ffn + (cfg.n_layers - n_moe) * dense_ffn
    return float(layers + 2 * d * cfg.vocab_size)


def train_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: forward + backward = 3 × forward."""
    return 3.0 * forward_flops_per_token(cfg)


def flops_6nd(cfg: ModelConfig, tokens: float) -> float:
    """The 6·N_active·D convention (Kaplan et al. 2020), N_active including embeddings (Pearce & Song 2024)."""
    return 6.0 * param_counts(cfg).active * tokens


def expert_sparsity(cfg: ModelConfig) -> float:
    """S = (E − k) / E over the routed experts (Abnar et al. 2025); 0 for dense."""
    return (cfg.n_experts - cfg.top_k) / cfg.n_experts


def param_sparsity(cfg: ModelConfig) -> float:
    """Fraction of parameters a token does not touch: 1 − N_active / N_total."""
    counts = param_counts(cfg)
    return 1.0 - counts.active / counts.total
