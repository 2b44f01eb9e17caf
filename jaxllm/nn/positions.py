"""Rotary position embeddings (RoPE, Su et al. 2021), in the rotate_half layout of HF Llama."""

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """theta^(-2i/d) for i = 0 .. d/2 - 1, in float32."""
    return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates x [batch, length, heads, head_dim] by the angle position * frequency.

    The first and second halves of the head dimension form the rotated pairs
    (rotate_half), so checkpoints in the HF Llama layout load without permutation.
    """
    freqs = rope_frequencies(x.shape[-1], theta)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, S, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
