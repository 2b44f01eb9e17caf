"""The shapes `benchmarks/gpu.py` measures, at full size for one GPU and at toy size for a CPU
(`tiny`): the dense Llama, the MoE models, the attention call, the batch and step counts."""

import dataclasses

from jaxllm.config import ModelConfig, MoEConfig


@dataclasses.dataclass(frozen=True)
class Run:
    """Batch and timing settings of every train-step section."""

    batch: int
    seq_len: int
    steps: int  # timed steps, after the warm-up
    warmup: int  # untimed steps after compiling
    moe_steps: int  # timed steps of each MoE model
    matmul_size: int


RUNS = {
    False: Run(batch=8, seq_len=2048, steps=10, warmup=2, moe_steps=5, matmul_size=8192),
    True: Run(batch=2, seq_len=64, steps=2, warmup=1, moe_steps=1, matmul_size=256),
}

# (routed experts, experts per token, expert width as a multiple of the model width)
MOE_SHAPES = {"moe_e8": (8, 2, 2.0), "moe_e64": (64, 6, 0.5)}


def run_settings(tiny: bool, **overrides) -> Run:
    """The run's settings, with the fields of `overrides` that are not None replaced."""
    given = {name: value for name, value in overrides.items() if value is not None}
    return dataclasses.replace(RUNS[tiny], **given)


def llama(tiny: bool) -> ModelConfig:
    """A Llama decoder: d 2048, 16 layers, 16 query / 8 kv heads of 128, SwiGLU 5632, vocab
    32000, untied head (about 0.9B parameters); or a toy one of the same structure."""
    if tiny:
        return ModelConfig(vocab_size=384, embed_dim=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, mlp_dim=176, norm_eps=1e-5)
    return ModelConfig(vocab_size=32_000, embed_dim=2048, num_layers=16, num_heads=16,
                       num_kv_heads=8, head_dim=128, mlp_dim=5632, norm_eps=1e-5)


def moe_model(section: str, tiny: bool) -> ModelConfig:
    """The MoE model of `section` (a key of MOE_SHAPES), every layer MoE, dropless: d 1024,
    8 layers, 8 query / 4 kv heads of 128, vocab 32000; or a toy one."""
    experts, k, width = MOE_SHAPES[section]
    if tiny:
        body = ModelConfig(vocab_size=384, embed_dim=128, num_layers=1, num_heads=4,
                           num_kv_heads=2, head_dim=16, mlp_dim=256)
    else:
        body = ModelConfig(vocab_size=32_000, embed_dim=1024, num_layers=8, num_heads=8,
                           num_kv_heads=4, head_dim=128, mlp_dim=4096)
    moe = MoEConfig(num_experts=experts, experts_per_token=k,
                    expert_dim=int(width * body.embed_dim))
    return dataclasses.replace(body, moe=moe, dtype="bfloat16")
