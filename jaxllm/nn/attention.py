"""Causal self-attention with multi-head, grouped-query and multi-query heads."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.nn.linear import Einsum
from jaxllm.nn.positions import apply_rope


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, S] segment ids -> [B, S, S] mask: key j is visible to query i iff j <= i and
    both lie in the same packed document."""
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same_segment


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention over all keys, with query heads grouped over the kv heads.

    Args:
      q: [B, T, H, D] queries.
      k, v: [B, S, K, D] keys and values; K divides H (K == H: MHA, K == 1: MQA).
      mask: [B, T, S] booleans, True where a query may attend to a key.

    Returns:
      [B, T, H, D]. Scores and softmax are computed in float32.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


class Attention(nn.Module):
    """Causal self-attention with RoPE; GQA when num_kv_heads < num_heads.

    Attributes:
      num_heads: query heads.
      num_kv_heads: key/value heads; must divide num_heads.
      head_dim: width of each head.
      rope_theta: RoPE base.
      dtype: compute dtype; parameters are float32.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x [B, S, E], positions and segment_ids [B, S] -> [B, S, E]."""

        def project(heads: int, head_axis: str, name: str) -> jax.Array:
            out = Einsum(
                (x.shape[-1], heads, self.head_dim), ("embed", head_axis, "head_dim"),
                "bse,ehd->bshd", dtype=self.dtype, name=name,
            )(x)
            return nn.with_logical_constraint(
                out, ("act_batch", "act_length", f"act_{head_axis}", None)
            )

        q = apply_rope(project(self.num_heads, "heads", "query"), positions, self.rope_theta)
        k = apply_rope(project(self.num_kv_heads, "kv_heads", "key"), positions, self.rope_theta)
        v = project(self.num_kv_heads, "kv_heads", "value")
        out = dot_product_attention(q, k, v, causal_segment_mask(segment_ids))
        out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", None))
        return Einsum(
            (self.num_heads, self.head_dim, x.shape[-1]), ("heads", "head_dim", "embed"),
            "bshd,hde->bse", fan_in=(0, 1), dtype=self.dtype, name="out",
        )(out)
