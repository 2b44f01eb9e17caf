"""Model presets. Experiment files compose these with mesh, data and training settings."""

import dataclasses

from jaxllm.config import ModelConfig, MoEConfig


def tiny_dense() -> ModelConfig:
    """A 2-layer GQA decoder that learns the arithmetic corpus on a laptop CPU in a minute."""
    return ModelConfig(
        vocab_size=384,
        embed_dim=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=384,
    )


def small_dense() -> ModelConfig:
    """About 46M parameters (4 layers, d=512, vocab 32k): the CPU benchmark model."""
    return ModelConfig(
        vocab_size=32_000,
        embed_dim=512,
        num_layers=4,
        num_heads=8,
        num_kv_heads=8,
        mlp_dim=1536,
    )


def tiny_mixtral() -> ModelConfig:
    """Mixtral's structure at tiny_dense's size: every layer MoE, 8 experts, softmax top-2,
    the Switch load-balance loss at HF Mixtral's 0.02."""
    moe = MoEConfig(
        num_experts=8, experts_per_token=2, expert_dim=192, router="softmax",
        load_balance_loss=0.02,
    )
    return dataclasses.replace(tiny_dense(), moe=moe)


def tiny_deepseek() -> ModelConfig:
    """DeepSeek-V3's structure: the first layer dense, then fine-grained experts (16 of width
    64, top-4) plus a shared expert; sigmoid scores with group-limited routing (4 groups,
    best 2), normalised top-k times 2.5, aux-loss-free bias balancing and a small
    sequence-wise aux loss. The bias rate is 10x V3's 0.001, so balance shows in 200 steps."""
    moe = MoEConfig(
        num_experts=16, experts_per_token=4, expert_dim=64, num_shared_experts=1,
        router="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4,
        topk_group=2, seq_aux_loss=1e-4, bias_update_rate=1e-2, first_dense_layers=1,
    )
    return dataclasses.replace(tiny_dense(), num_layers=3, moe=moe)


def tiny_llama4() -> ModelConfig:
    """Llama 4 Maverick's MoE structure: dense and MoE layers alternate (layers 1 and 3 are
    MoE), each MoE layer routes top-1 with a sigmoid weight and adds a shared expert. (The
    NoPE and chunked-attention layers of Llama 4 are not modelled.)"""
    moe = MoEConfig(
        num_experts=8, experts_per_token=1, expert_dim=192, num_shared_experts=1,
        router="sigmoid", norm_topk_prob=False, moe_every=2,
    )
    return dataclasses.replace(tiny_dense(), num_layers=4, moe=moe)


def tiny_kimi() -> ModelConfig:
    """Kimi K2's structure next to tiny_deepseek's: more routed experts (32, top-4) and half
    the attention heads, one expert group (no group limit), scaling 2.827, the first layer
    dense and a shared expert, as in the published K2 config."""
    moe = dataclasses.replace(
        tiny_deepseek().moe, num_experts=32, n_group=1, topk_group=1, routed_scaling_factor=2.827
    )
    return dataclasses.replace(tiny_deepseek(), num_heads=2, num_kv_heads=2, moe=moe)


def llama3_8b() -> ModelConfig:
    """Llama-3-8B (Meta, HF `meta-llama/Meta-Llama-3-8B` config.json): 8,030,261,248
    parameters, GQA 32/8 heads, untied head, RoPE theta 500000, bf16 compute."""
    return ModelConfig(
        vocab_size=128_256,
        embed_dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14_336,
        rope_theta=500_000.0,
        norm_eps=1e-5,
        dtype="bfloat16",
    )


def _mixtral(vocab_size: int, embed_dim: int, num_layers: int, num_heads: int,
             expert_dim: int) -> ModelConfig:
    """Mixtral's layout: every layer MoE, 8 SwiGLU experts, softmax over the top-2 logits
    (softmax then renormalised top-k), GQA with 8 kv heads, RoPE theta 1e6, untied head,
    the Switch load-balance loss at HF's router_aux_loss_coef 0.02. `mlp_dim` is unused."""
    moe = MoEConfig(
        num_experts=8, experts_per_token=2, expert_dim=expert_dim, router="softmax",
        norm_topk_prob=True, load_balance_loss=0.02,
    )
    return ModelConfig(
        vocab_size=vocab_size,
        embed_dim=embed_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=8,
        mlp_dim=expert_dim,
        rope_theta=1e6,
        norm_eps=1e-5,
        dtype="bfloat16",
        moe=moe,
    )


def mixtral_8x7b() -> ModelConfig:
    """Mixtral 8x7B (Mistral AI, HF `mistralai/Mixtral-8x7B-v0.1` config.json): 46.7B total,
    12.9B active; d 4096, 32 layers, 32/8 heads, experts of width 14336, vocab 32000."""
    return _mixtral(32_000, 4096, 32, 32, 14_336)


def mixtral_8x22b() -> ModelConfig:
    """Mixtral 8x22B (Mistral AI, HF `mistralai/Mixtral-8x22B-v0.1` config.json): 141B total,
    39B active; d 6144, 56 layers, 48/8 heads, experts of width 16384, vocab 32768."""
    return _mixtral(32_768, 6144, 56, 48, 16_384)


PRESETS = {
    "tiny_dense": tiny_dense,
    "small_dense": small_dense,
    "tiny_mixtral": tiny_mixtral,
    "tiny_deepseek": tiny_deepseek,
    "tiny_llama4": tiny_llama4,
    "tiny_kimi": tiny_kimi,
    "llama3_8b": llama3_8b,
    "mixtral_8x7b": mixtral_8x7b,
    "mixtral_8x22b": mixtral_8x22b,
}
