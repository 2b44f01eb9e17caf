"""Causal self-attention with multi-head, grouped-query and multi-query heads."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.nn.linear import Einsum
from jaxllm.nn.positions import apply_rope
from jaxllm.nn.ring import all_gather_attention, context_shards, ring_attention

# How attention runs when the mesh splits sequences over `context` (ModelConfig field).
CONTEXT_PARALLEL = {"ring": ring_attention, "all_gather": all_gather_attention}


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

    The G = H / K query heads of a group are folded into the query axis, so that every
    product is a plain [B, K] batch of [G*T, D] x [D, S] matrix products and no key or value
    is copied per query head. On XLA:CPU this measured 1.5x faster, fwd+bwd, than a
    [B, K, G] batch with a group axis, and 10x faster than repeated kv heads when decoding.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, groups * length, head_dim)
    mask = jnp.tile(mask[:, None], (1, 1, groups, 1))
    out = _attention(q, k, v, mask)
    out = out.reshape(batch, kv_heads, groups, length, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, length, heads, head_dim)


@jax.custom_vjp
def _attention(q, k, v, mask):
    """q [B, K, Q, D], k and v [B, S, K, D], mask [B, 1, Q, S] -> [B, K, Q, D]."""
    return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bkqd,bskd->bkqs", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkqs,bskd->bkqd", probs.astype(v.dtype), v)
    return out, (q, k, v, probs, out)


def _attention_bwd(residuals, d_out):
    """The gradient from the saved probabilities P, as in FlashAttention:
    dS = P * (dO V^T - rowsum(dO * O)), with no pass back through the softmax."""
    q, k, v, probs, out = residuals
    scale = q.shape[-1] ** -0.5
    d_v = jnp.einsum("bkqs,bkqd->bskd", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("bkqd,bskd->bkqs", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.einsum("bkqd,bkqd->bkq", d_out, out, preferred_element_type=jnp.float32)
    d_scores = (probs * (d_probs - row[..., None]) * scale).astype(q.dtype)
    d_q = jnp.einsum("bkqs,bskd->bkqd", d_scores, k)
    d_k = jnp.einsum("bkqs,bkqd->bskd", d_scores, q)
    return d_q, d_k, d_v, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def cache_mask(query_slots: jax.Array, positions: jax.Array, cache_len: int) -> jax.Array:
    """The keys each query sees in a KV cache whose slot s holds a row's position
    s - (query_slot - query_position): those at positions 0 .. query_position.

    Args:
      query_slots: [T] cache slots the queries are written to.
      positions: [B, T] the queries' positions in their own sequences.
      cache_len: L, the number of cache slots.

    Returns:
      [B, T, L] booleans. Slots left of a row's first token (left padding) stay hidden.
    """
    key_slots = jnp.arange(cache_len)
    first = query_slots - positions  # [B, T] the slot of position 0
    return (key_slots >= first[..., None]) & (key_slots <= query_slots[:, None])


class Attention(nn.Module):
    """Causal self-attention with RoPE; GQA when num_kv_heads < num_heads.

    Attributes:
      num_heads: query heads.
      num_kv_heads: key/value heads; must divide num_heads.
      head_dim: width of each head.
      rope_theta: RoPE base.
      dtype: compute dtype; parameters are float32.
      decode: attend over a KV cache, the "cache" collection: `cached_key`, `cached_value`
        [B, L, K, D] and the next free slot `cache_index`. `init` sizes L to the input length;
        each call writes its T tokens at slots index .. index + T - 1.
      context_parallel: with a mesh `context` axis > 1, "ring" passes K/V around the ring;
        "all_gather" gathers every K/V block (the simple baseline).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    dtype: jnp.dtype = jnp.float32
    decode: bool = False
    context_parallel: str = "ring"

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x [B, S, E], positions and segment_ids [B, S] -> [B, S, E].

        When decoding, `segment_ids` is unused: `positions` place each row in the cache.
        """

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
        if self.decode:
            k, v, mask = self._update_cache(k, v, positions)
            out = dot_product_attention(q, k, v, mask)
        elif context_shards() > 1:  # the sequence is split over the mesh's context axis
            kernel = CONTEXT_PARALLEL[self.context_parallel]
            out = kernel(q, k, v, positions, segment_ids)
        else:
            out = dot_product_attention(q, k, v, causal_segment_mask(segment_ids))
        out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", None))
        return Einsum(
            (self.num_heads, self.head_dim, x.shape[-1]), ("heads", "head_dim", "embed"),
            "bshd,hde->bse", fan_in=(0, 1), dtype=self.dtype, name="out",
        )(out)

    def _update_cache(self, k, v, positions):
        """Writes k, v [B, T, K, D] into the cache; returns the whole cache and its mask."""
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        start, length = index.value, k.shape[1]
        axes = ("act_batch", None, "act_kv_heads", None)
        for cached, new in ((cached_k, k), (cached_v, v)):
            updated = jax.lax.dynamic_update_slice(cached.value, new, (0, start, 0, 0))
            cached.value = nn.with_logical_constraint(updated, axes)
        index.value = start + length
        mask = cache_mask(start + jnp.arange(length), positions, cached_k.value.shape[1])
        return cached_k.value, cached_v.value, mask
