"""Position encodings: RoPE (Su et al. 2021) in the rotate_half layout of HF Llama, with linear,
YaRN (Peng et al. 2023) and Llama 3.1 scaling, and ALiBi slopes (Press et al. 2022)."""

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling for long context (HF `rope_scaling`)."""

    kind: Literal["linear", "yarn", "llama3"]
    factor: float  # context extension factor, e.g. 40 for DeepSeek-V3
    original_max_len: int = 4096  # the pretraining context (HF original_max_position_embeddings)
    beta_fast: float = 32.0  # YaRN ramp bounds, in rotations over original_max_len
    beta_slow: float = 1.0
    low_freq_factor: float = 1.0  # llama3: wavelengths over original_max_len / this are scaled
    high_freq_factor: float = 4.0  # ... those under original_max_len / this are kept


def rope_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> jax.Array:
    """theta^(-2i/d) for i = 0 .. d/2 - 1, in float32, optionally scaled.

    linear: every frequency divided by factor. llama3 (Llama 3.1): frequencies that make fewer
    than low_freq_factor rotations over the original context L are divided by factor, those
    making more than high_freq_factor are kept, and in between the two blend linearly in the
    rotation count. yarn: pair i makes L * f_i / (2 pi) rotations over
    the original context L. Solving for i at beta_fast and beta_slow rotations and rounding outward
    (floor, ceil; the HF / DeepSeek-V3 correction range) gives [low, high]; pairs below low keep f_i,
    pairs above high get f_i / factor, and a linear ramp in i blends the two in between.
    """
    freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is None:
        return freqs
    if scaling.kind == "linear":
        return freqs / scaling.factor
    if scaling.kind == "llama3":  # a blend, linear in original_max_len / wavelength
        rotations = scaling.original_max_len * freqs / (2 * math.pi)
        kept = (rotations - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        kept = jnp.clip(kept, 0.0, 1.0)
        return freqs * kept + freqs / scaling.factor * (1 - kept)
    if scaling.kind != "yarn":
        raise ValueError(f"unknown RoPE scaling kind {scaling.kind!r}")

    def pair_index(rotations):  # the i at which pair i makes `rotations` turns over L
        wavelength = scaling.original_max_len / rotations
        return head_dim * math.log(wavelength / (2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_index(scaling.beta_fast)), 0)
    high = min(math.ceil(pair_index(scaling.beta_slow)), head_dim - 1)
    high = high + 0.001 if high == low else high
    pairs = jnp.arange(head_dim // 2, dtype=jnp.float32)
    interpolate = jnp.clip((pairs - low) / (high - low), 0.0, 1.0)
    return freqs * (1 - interpolate) + freqs / scaling.factor * interpolate


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def softmax_scale(head_dim: int, scaling: RopeScaling | None = None) -> float:
    """head_dim^-1/2, times yarn_mscale(factor)^2 under YaRN (the DeepSeek convention)."""
    yarn = scaling is not None and scaling.kind == "yarn"
    temperature = yarn_mscale(scaling.factor) ** 2 if yarn else 1.0
    return head_dim**-0.5 * temperature


def apply_rope(
    x: jax.Array, positions: jax.Array, theta: float, scaling: RopeScaling | None = None
) -> jax.Array:
    """Rotates x [batch, length, heads, head_dim] by the angle position * frequency.

    The first and second halves of the head dimension form the rotated pairs
    (rotate_half), so checkpoints in the HF Llama layout load without permutation.
    """
    freqs = rope_frequencies(x.shape[-1], theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, S, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes, float32 [num_heads]: 2^(-8k/n) for k = 1..n when n is a power of two;
    otherwise the m-head slopes (m the largest power of two below n), then the odd-k slopes of the
    2m-head schedule until there are n."""

    def schedule(n):
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    m = 2 ** math.floor(math.log2(num_heads))
    slopes = schedule(m) + schedule(2 * m)[0::2][: num_heads - m]
    return np.asarray(slopes, dtype=np.float32)
