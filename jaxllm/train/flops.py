"""FLOP accounting for MFU, and the peak it is measured against."""

import functools
import time

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig

# Dense bf16 peak per chip, from the vendors' spec sheets.
KNOWN_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def matmul_params(cfg: ModelConfig, num_params: int) -> int:
    """Parameters that take part in a matmul for every token: all of them except the input
    embedding table, which is a lookup (a tied table is counted once, as the head), the
    image patch embedding, which only `<patch>` tokens use, and the routed experts a token
    does not choose (E - k of E in each MoE layer)."""
    embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.embed_dim
    if cfg.vision.image_size:  # proj kernel and bias, the row and col tables
        embedding += (cfg.vision.patch_dim + 1 + 2 * cfg.vision.grid) * cfg.embed_dim
    inactive = 0
    if cfg.moe is not None:
        per_expert = 3 * cfg.embed_dim * cfg.moe.expert_dim
        unchosen = cfg.moe.num_experts - cfg.moe.experts_per_token
        inactive = sum(cfg.moe_layers()) * unchosen * per_expert
    return num_params - embedding - inactive


def train_flops_per_token(cfg: ModelConfig, num_params: int, seq_len: int) -> float:
    """Model FLOPs per trained token, the PaLM (appendix B) convention:

        6 * N + 6 * L * H * (d_qk + d_v) * S

    N is `matmul_params`; d_qk and d_v are the query/key and value head widths (both d_head,
    giving PaLM's 12 * L * H * d_head * S, except under MLA). The attention term counts the
    full S x S score matrix, not halved for causality, as in PaLM, in the L attention layers
    (SSM layers count only their parameters). Rematerialisation is not counted (model FLOPs,
    not hardware FLOPs).
    """
    layers = sum(cfg.attention.layer(i)[0] != "ssm" for i in range(cfg.num_layers))
    mla = cfg.attention.mla
    if mla is None:
        qk_width = value_width = cfg.resolved_head_dim
    else:
        qk_width, value_width = mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.v_head_dim
    attention = 6 * layers * cfg.num_heads * (qk_width + value_width) * seq_len
    return 6 * matmul_params(cfg, num_params) + attention


def measure_matmul_peak(size: int = 4096, dtype=jnp.float32, repeats: int = 5) -> float:
    """The best FLOP/s of an n x n x n matmul on the default device, over `repeats` runs."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


@functools.cache
def peak_flops_per_device(dtype=jnp.float32) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from), measured once per process."""
    kind = jax.devices()[0].device_kind
    for name, flops in KNOWN_PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops, f"{name} spec sheet"
    # On CPU the 8 simulated devices of the tests share the same cores: measure the host,
    # at a size that reaches its peak in a fraction of a second.
    peak = measure_matmul_peak(1024, dtype) / jax.local_device_count()
    return peak, f"measured {jnp.dtype(dtype).name} matmul on {kind}"
