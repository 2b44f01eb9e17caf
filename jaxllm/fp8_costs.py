"""What fp8 matmuls (`model.fp8`, `docs/fp8.md`) change in a training step: an estimate
from parameter counts, for the calculator and `jaxllm compile`.

The fp8 matmuls are the attention projections and the dense, routed and shared expert
SwiGLUs; their active parameters P_8 (the calculator's categories attention, dense_ffn,
experts and shared_experts, which also hold the few qkv biases and sparse-attention indexer
weights that stay in the compute dtype) do 6 P_8 of the train FLOPs F per token, a share
s = 6 P_8 / F. If matmuls ran at the fp8 peak, twice the bf16 peak on the H100 spec sheet,
and the step were bound by matmul FLOPs, its time would shrink at best to 1 - s / 2.
Their weights read as fp8 take 1 byte per value, plus a float32 scale per B x B block
(blockwise; tensorwise's one scale per tensor is left out).
"""

import dataclasses

import jax.numpy as jnp

from jaxllm.config import ModelConfig

FP8_CATEGORIES = ("attention", "dense_ffn", "experts", "shared_experts")


@dataclasses.dataclass(frozen=True)
class Fp8Estimate:
    """Estimates for one model; bytes are of the whole model, not per device."""

    recipe: str
    active_params: int  # P_8: active parameters of the fp8 matmuls
    flops_share: float  # s: their share of the train FLOPs per token
    weight_bytes: int  # their weights (all experts) as fp8 values and scales
    compute_weight_bytes: int  # the same weights in the compute dtype

    @property
    def step_time_bound(self) -> float:
        """The least step time, relative to bf16, at an fp8 peak twice the bf16 peak."""
        return 1.0 - self.flops_share / 2


def estimate(model: ModelConfig, total: dict[str, int], active: dict[str, int],
             train_flops_per_token: float) -> Fp8Estimate | None:
    """The estimate from the calculator's parameter counts by category; None without fp8."""
    if model.fp8 == "none":
        return None
    weights = sum(total.get(c, 0) for c in FP8_CATEGORIES)
    matmul = sum(active.get(c, 0) for c in FP8_CATEGORIES)
    scales = -(-weights // model.fp8_block_size**2) if model.fp8 == "blockwise" else 0
    return Fp8Estimate(
        recipe=model.fp8,
        active_params=matmul,
        flops_share=6 * matmul / train_flops_per_token,
        weight_bytes=weights + 4 * scales,
        compute_weight_bytes=weights * jnp.dtype(model.dtype).itemsize,
    )


def _gib(value: int) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{value / 2**30:,.2f} GiB" if value >= 2**30 else f"{value / 2**20:,.2f} MiB"


def describe(e: Fp8Estimate) -> str:
    """One line for a report."""
    return (f"{e.recipe}: {e.flops_share:.0%} of train FLOPs in fp8 matmuls; their weights "
            f"{_gib(e.weight_bytes)} in fp8 vs {_gib(e.compute_weight_bytes)}; step time >= "
            f"{e.step_time_bound:.0%} of bf16 at 2x peak (estimate)")
