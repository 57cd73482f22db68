"""Accounting against hand-computed counts (see the arithmetic in each test)."""

import pytest

from scaling.config import ConfigError, ModelConfig
from scaling.flops import expert_sparsity, flops_6nd, forward_flops_per_token, param_counts, param_sparsity


def test_dense_hand_count():
    cfg = ModelConfig(vocab_size=256, context=128, d_model=64, n_layers=2, n_heads=4, d_ff=256)
    counts = param_counts(cfg)
    # embeddings 256·64 + 128·64; per layer 2 LNs (4·64) + attention 4·64² + MLP 2·64·256; final LN 2·64
    assert counts.embedding == 24576
    assert counts.total == 24576 + 2 * (256 + 16384 + 32768) + 128 == 123520
    assert counts.active == counts.total
    assert counts.non_embedding == counts.total - counts.embedding
    # per layer: qkv+proj 2·4·64², logits+reduction 2·2·128·64, MLP 2·2·64·256; unembedding 2·64·256
    assert forward_flops_per_token(cfg) == 2 * (32768 + 32768 + 65536) + 32768 == 294912
    assert expert_sparsity(cfg) == 0.0 and param_sparsity(cfg) == 0.0
    assert flops_6nd(cfg, 1000) == 6 * 123520 * 1000


def test_moe_hand_count():
    cfg = ModelConfig(vocab_size=256, context=128, d_model=64, n_layers=2, n_heads=4, d_ff=256, n_experts=8, top_k=2)
    counts = param_counts(cfg)
    # per layer: LNs 256, attention 16384, router 64·8, 8 experts of 2·64·256 (2 active)
    assert counts.total == 24576 + 2 * (256 + 16384 + 512 + 8 * 32768) + 128 == 583296
    assert counts.active == 24576 + 2 * (256 + 16384 + 512 + 2 * 32768) + 128 == 190080
    assert forward_flops_per_token(cfg) == 2 * (65536 + 2 * 512 + 2 * 2 * 32768) + 32768 == 428032
    assert expert_sparsity(cfg) == 0.75
    assert param_sparsity(cfg) == pytest.approx(1 - 190080 / 583296)


def test_shared_weights_noise_untied_rotary():
    cfg = ModelConfig(vocab_size=256, context=64, d_model=32, n_layers=3, n_heads=2, d_ff=128, n_experts=4,
                      top_k=1, share_weights=True, router_noise=True)
    counts = param_counts(cfg)
    # one attention (4·32²) and one expert bank (4·2·32·128) shared; per-layer LNs and routers (+noise) 2·32·4
    assert counts.total == 8192 + 2048 + (3 * 128 + 64) + 3 * 256 + 4096 + 32768 == 48320
    assert counts.active == 48320 - 3 * 8192 == 23744
    # shared weights still cost FLOPs in each of the 3 layers
    assert forward_flops_per_token(cfg) == 3 * (8192 + 8192 + 512 + 16384) + 16384 == 116224
    untied = ModelConfig(vocab_size=256, context=64, d_model=32, n_layers=1, n_heads=2, d_ff=128,
                         tie_embeddings=False, positional="rotary")
    assert param_counts(untied).embedding == 2 * 256 * 32


def test_granularity_shared_experts_moe_every():
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=2, d_ff=128, n_experts=8, top_k=2, granularity=2,
                      shared_experts=1, moe_every=2, vocab_size=256, context=64)
    assert cfg.d_expert == 64 and cfg.n_moe_layers == 2
    counts = param_counts(cfg)
    dense_layer = 128 + 4096 + 2 * 32 * 128
    moe_total = 128 + 4096 + 32 * 8 + (8 + 1) * 2 * 32 * 64
    moe_active = 128 + 4096 + 32 * 8 + (2 + 1) * 2 * 32 * 64
    emb = 256 * 32 + 64 * 32
    assert counts.total == emb + 2 * dense_layer + 2 * moe_total + 64
    assert counts.active == emb + 2 * dense_layer + 2 * moe_active + 64


def test_invalid_model():
    with pytest.raises(ConfigError, match="top_k"):
        ModelConfig(n_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=30, n_heads=4)
