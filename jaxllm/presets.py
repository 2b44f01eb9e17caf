"""Model presets. Experiment files compose these with mesh, data and training settings;
`jaxllm pretrain NAME` runs one with the default settings (`run_config`)."""

import dataclasses

from jaxllm.config import (
    AttentionConfig, Config, MLAConfig, ModelConfig, MoEConfig, SparseConfig, SSMConfig,
)


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
    """DeepSeek-V3's structure: Multi-head Latent Attention (a query latent, a 32-wide KV
    latent and a shared rotary key) with YaRN; the first layer dense, then fine-grained
    experts (16 of width 64, top-4) plus a shared expert; sigmoid scores with group-limited
    routing (4 groups, best 2), normalised top-k times 2.5, aux-loss-free bias balancing and
    a small sequence-wise aux loss. The bias rate is 10x V3's 0.001, so balance shows in 200
    steps."""
    moe = MoEConfig(
        num_experts=16, experts_per_token=4, expert_dim=64, num_shared_experts=1,
        router="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4,
        topk_group=2, seq_aux_loss=1e-4, bias_update_rate=1e-2, first_dense_layers=1,
    )
    mla = MLAConfig(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                    v_head_dim=32)
    attention = AttentionConfig(mla=mla, rope_scaling="yarn", rope_factor=4.0,
                                rope_original_len=64)
    return dataclasses.replace(tiny_dense(), num_layers=3, num_kv_heads=4, moe=moe,
                               attention=attention)


def tiny_deepseek_v32() -> ModelConfig:
    """DeepSeek-V3.2's structure: tiny_deepseek with DeepSeek sparse attention in every
    layer, a 4-head lightning indexer picking each query's top 32 keys."""
    base = tiny_deepseek()
    sparse = SparseConfig(top_k=32, indexer_heads=4, indexer_head_dim=32)
    attention = dataclasses.replace(base.attention, pattern="sparse", sparse=sparse)
    return dataclasses.replace(base, attention=attention)


def tiny_llama4() -> ModelConfig:
    """Llama 4 Maverick's structure: dense and MoE layers alternate (layers 1 and 3 are
    MoE), each MoE layer routes top-1 with a sigmoid weight on the expert's input and adds a
    shared expert; three chunked-attention RoPE layers, then one global NoPE layer."""
    moe = MoEConfig(
        num_experts=8, experts_per_token=1, expert_dim=192, num_shared_experts=1,
        router="sigmoid", norm_topk_prob=False, weight_inputs=True, moe_every=2,
    )
    attention = AttentionConfig(pattern="chunked,chunked,chunked,global",
                                positions="rope,rope,rope,none", chunk=32)
    return dataclasses.replace(tiny_dense(), num_layers=4, moe=moe, attention=attention)


def tiny_llama4_scout() -> ModelConfig:
    """Llama 4 Scout's structure: tiny_llama4 with every layer MoE and L2 qk-norm in the
    RoPE layers."""
    base = tiny_llama4()
    return dataclasses.replace(base, moe=dataclasses.replace(base.moe, moe_every=1),
                               attention=dataclasses.replace(base.attention, qk_norm="l2"))


def tiny_kimi() -> ModelConfig:
    """Kimi K2's structure next to tiny_deepseek's: more routed experts (32, top-4) and half
    the attention heads, one expert group (no group limit), scaling 2.827, the first layer
    dense and a shared expert, as in the published K2 config."""
    moe = dataclasses.replace(
        tiny_deepseek().moe, num_experts=32, n_group=1, topk_group=1, routed_scaling_factor=2.827
    )
    return dataclasses.replace(tiny_deepseek(), num_heads=2, num_kv_heads=2, moe=moe)


def tiny_qwen3() -> ModelConfig:
    """Qwen3-MoE's structure: every layer MoE, 16 experts top-4 with softmax scores and
    normalised top-k, no shared expert; per-head RMSNorm on queries and keys."""
    moe = MoEConfig(num_experts=16, experts_per_token=4, expert_dim=64, router="softmax",
                    norm_topk_prob=True, load_balance_loss=0.001)
    return dataclasses.replace(tiny_dense(), moe=moe, attention=AttentionConfig(qk_norm="rms"))


def tiny_local() -> ModelConfig:
    """tiny_dense with local attention: a sliding-window ALiBi layer, a strided sparse RoPE
    layer and a global NoPE layer, all on the blockwise kernel."""
    attention = AttentionConfig(pattern="sliding,strided,global", positions="alibi,rope,none",
                                window=32, stride=16, kernel="blockwise", block_size=32)
    return dataclasses.replace(tiny_dense(), num_layers=3, attention=attention)


def tiny_hybrid() -> ModelConfig:
    """A hybrid of Mamba-2 and attention (as Jamba, Nemotron-H, Qwen3-Next): tiny_dense's
    width in 4 layers, three Mamba-2 SSD layers (8 heads of 32, state 32) then one global
    attention layer (`docs/hybrid.md`)."""
    ssm = SSMConfig(num_heads=8, head_dim=32, state_dim=32, conv_width=4, chunk=32)
    attention = AttentionConfig(pattern="ssm,ssm,ssm,global", ssm=ssm)
    return dataclasses.replace(tiny_dense(), num_layers=4, attention=attention)


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


def llama3_1b() -> ModelConfig:
    """A Llama 3 decoder of Llama-3.2-1B's dimensions (HF `meta-llama/Llama-3.2-1B`
    config.json) without its long-context llama3 RoPE scaling: 1,235,814,400 parameters,
    d 2048, 16 layers, GQA 32/8 heads, FFN 8192, tied 128256-token embedding, RoPE theta
    500000, bf16 compute."""
    return ModelConfig(
        vocab_size=128_256,
        embed_dim=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=8192,
        rope_theta=500_000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
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


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 (HF `deepseek-ai/DeepSeek-V3` config.json): 671B total, 37B active
    without the input embedding and the MTP module; d 7168, 61 layers, MLA with 128 heads
    (q_lora 1536, kv_lora 512, qk 128 + 64 rope, v 128), the first 3 layers dense (FFN
    18432), then 1 shared + 256 routed experts of width 2048, top-8, sigmoid scores with 8
    groups (best 4), normalised top-k times 2.5 and aux-loss-free bias balancing; RoPE 1e4
    with YaRN x40 from 4096; vocab 129280."""
    moe = MoEConfig(
        num_experts=256, experts_per_token=8, expert_dim=2048, num_shared_experts=1,
        router="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8,
        topk_group=4, bias_update_rate=1e-3, first_dense_layers=3,
    )
    mla = MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128)
    attention = AttentionConfig(mla=mla, rope_scaling="yarn", rope_factor=40.0,
                                rope_original_len=4096)
    return ModelConfig(
        vocab_size=129_280, embed_dim=7168, num_layers=61, num_heads=128, num_kv_heads=128,
        mlp_dim=18_432, rope_theta=10_000.0, dtype="bfloat16", moe=moe, attention=attention,
    )


def deepseek_v32() -> ModelConfig:
    """DeepSeek-V3.2-Exp: DeepSeek-V3 plus DeepSeek sparse attention in every layer, a
    lightning indexer of 64 heads x 128 picking each query's top 2048 keys. (V3.2's indexer
    also reads the query latent and normalises its key; ours reads the layer input, so its
    parameter count differs slightly.)"""
    base = deepseek_v3()
    sparse = SparseConfig(top_k=2048, indexer_heads=64, indexer_head_dim=128)
    attention = dataclasses.replace(base.attention, pattern="sparse", sparse=sparse)
    return dataclasses.replace(base, attention=attention)


def kimi_k2() -> ModelConfig:
    """Kimi K2 (HF `moonshotai/Kimi-K2-Instruct` config.json): about 1T total ("1T"; 1026B
    by the config), 32B active without the input embedding; DeepSeek-V3's MLA with 64 heads,
    the first layer dense, then 1 shared + 384 routed experts of width 2048, top-8, sigmoid
    in one group, scale 2.827; RoPE 5e4 with YaRN x32 from 4096; vocab 163840."""
    base = deepseek_v3()
    moe = dataclasses.replace(base.moe, num_experts=384, n_group=1, topk_group=1,
                              routed_scaling_factor=2.827, first_dense_layers=1)
    attention = dataclasses.replace(base.attention, rope_factor=32.0)
    return dataclasses.replace(base, vocab_size=163_840, num_heads=64, num_kv_heads=64,
                               rope_theta=50_000.0, moe=moe, attention=attention)


def _llama4(num_experts: int, moe_every: int, qk_norm: str) -> ModelConfig:
    """Llama 4's layout: d 5120, 48 layers, GQA 40/8 heads of 128; MoE layers route top-1
    with a sigmoid weight on the expert's input and add a shared expert, all of width 8192;
    dense layers have FFN 16384; three chunked (8192) RoPE layers, then a global NoPE layer;
    RoPE 5e5."""
    moe = MoEConfig(num_experts=num_experts, experts_per_token=1, expert_dim=8192,
                    num_shared_experts=1, router="sigmoid", norm_topk_prob=False,
                    weight_inputs=True, moe_every=moe_every)
    attention = AttentionConfig(pattern="chunked,chunked,chunked,global",
                                positions="rope,rope,rope,none", chunk=8192, qk_norm=qk_norm)
    return ModelConfig(
        vocab_size=202_048, embed_dim=5120, num_layers=48, num_heads=40, num_kv_heads=8,
        head_dim=128, mlp_dim=16_384, rope_theta=500_000.0, norm_eps=1e-5, dtype="bfloat16",
        moe=moe, attention=attention,
    )


def llama4_scout() -> ModelConfig:
    """Llama 4 Scout (HF `meta-llama/Llama-4-Scout-17B-16E` text config): 109B total (108.6B
    with the vision tower; 107.8B text-only, as here), 17B active; every layer MoE with 16
    experts; L2 qk-norm in the RoPE layers. Not the "70B dense" model it is sometimes
    called: it is a mixture of experts."""
    return _llama4(num_experts=16, moe_every=1, qk_norm="l2")


def llama4_maverick() -> ModelConfig:
    """Llama 4 Maverick (HF `meta-llama/Llama-4-Maverick-17B-128E` text config): 400B total,
    17B active; dense and MoE layers alternate (layers 1, 3, ..., 47 are MoE, 128 experts);
    no qk-norm."""
    return _llama4(num_experts=128, moe_every=2, qk_norm="none")


def _qwen3_moe(embed_dim: int, num_layers: int, num_heads: int, expert_dim: int) -> ModelConfig:
    """Qwen3-MoE's layout: every layer MoE, 128 experts top-8, softmax scores with
    normalised top-k, no shared expert; GQA with 4 kv heads of 128 and per-head RMSNorm on
    queries and keys; RoPE 1e6; vocab 151936."""
    moe = MoEConfig(num_experts=128, experts_per_token=8, expert_dim=expert_dim,
                    router="softmax", norm_topk_prob=True, load_balance_loss=0.001)
    return ModelConfig(
        vocab_size=151_936, embed_dim=embed_dim, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=4, head_dim=128, mlp_dim=expert_dim, rope_theta=1e6, dtype="bfloat16",
        moe=moe, attention=AttentionConfig(qk_norm="rms"),
    )


def qwen3_235b_a22b() -> ModelConfig:
    """Qwen3-235B-A22B (HF `Qwen/Qwen3-235B-A22B` config.json): 235B total, 22B active;
    d 4096, 94 layers, 64 query heads, experts of width 1536."""
    return _qwen3_moe(4096, 94, 64, 1536)


def qwen3_30b_a3b() -> ModelConfig:
    """Qwen3-30B-A3B (HF `Qwen/Qwen3-30B-A3B` config.json): 30.5B total, 3.3B active;
    d 2048, 48 layers, 32 query heads, experts of width 768."""
    return _qwen3_moe(2048, 48, 32, 768)


PRESETS = {
    "tiny_dense": tiny_dense,
    "small_dense": small_dense,
    "tiny_mixtral": tiny_mixtral,
    "tiny_deepseek": tiny_deepseek,
    "tiny_llama4": tiny_llama4,
    "tiny_llama4_scout": tiny_llama4_scout,
    "tiny_kimi": tiny_kimi,
    "tiny_deepseek_v32": tiny_deepseek_v32,
    "tiny_qwen3": tiny_qwen3,
    "tiny_local": tiny_local,
    "tiny_hybrid": tiny_hybrid,
    "llama3_1b": llama3_1b,
    "llama3_8b": llama3_8b,
    "mixtral_8x7b": mixtral_8x7b,
    "mixtral_8x22b": mixtral_8x22b,
    "deepseek_v3": deepseek_v3,
    "deepseek_v32": deepseek_v32,
    "kimi_k2": kimi_k2,
    "llama4_scout": llama4_scout,
    "llama4_maverick": llama4_maverick,
    "qwen3_235b_a22b": qwen3_235b_a22b,
    "qwen3_30b_a3b": qwen3_30b_a3b,
}


def run_config(name: str) -> Config:
    """The run of preset `name` that `jaxllm pretrain NAME` starts: the default data (the
    offline reasoning corpus) and training settings, sized for a CPU, in runs/NAME."""
    return Config(model=PRESETS[name](), workdir=f"runs/{name}")
