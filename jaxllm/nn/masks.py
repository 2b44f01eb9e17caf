"""Attention masks and score biases, from token indices and packed-document ids.

Masks compare token indices within a row: 0..S-1 in training, where packed documents are
told apart by their segment ids, and each token's position in a KV cache. Inside one
document the two differ by a constant, so causal, sliding and ALiBi terms are the same.
Chunked and strided terms read the index itself: a packed document that starts off a
multiple of the chunk or stride is cut at other places than the same document alone in a
cache (GRPO's rollouts start every row at column 0 for this reason).
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which earlier keys a query may see.

    kind: global (every earlier key), sliding (the `window` keys ending at the query),
    chunked (Llama 4: earlier keys in the same block of `chunk` tokens), strided (the
    sliding window plus every key at index stride-1 mod stride: Child et al. 2019),
    bidirectional (not causal: the keys less than `window` away on either side, or every
    key when window is 0; context-parallel attention offers it).
    """

    kind: str = "global"
    window: int = 0
    chunk: int = 0
    stride: int = 0

    def allows(self, q_idx: jax.Array, k_idx: jax.Array) -> jax.Array:
        """Booleans, broadcast over matching shapes of query and key indices."""
        delta = q_idx - k_idx
        causal = delta >= 0
        if self.kind == "global":
            return causal
        if self.kind == "sliding":
            return causal & (delta < self.window)
        if self.kind == "chunked":
            return causal & (q_idx // self.chunk == k_idx // self.chunk)
        if self.kind == "strided":
            return causal & ((delta < self.window) | (k_idx % self.stride == self.stride - 1))
        if self.kind == "bidirectional":
            return abs(delta) < self.window if self.window else True
        raise ValueError(f"unknown mask kind {self.kind!r}")


def visible(mask: Mask, q_idx, q_seg, k_idx, k_seg) -> jax.Array:
    """[B, T] query and [B, S] key indices and segment ids -> [B, T, S] booleans: the key
    lies in the query's segment and `mask` allows it. Works on numpy and jax arrays alike."""
    same_segment = q_seg[:, :, None] == k_seg[:, None, :]
    return same_segment & mask.allows(q_idx[:, :, None], k_idx[:, None, :])


def row_indices(tokens: jax.Array) -> jax.Array:
    """[B, S] -> each token's index 0..S-1 in its row, the index masks compare."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, S] segment ids -> [B, S, S] mask: key j is visible to query i iff j <= i and
    both lie in the same packed document."""
    idx = row_indices(segment_ids)
    return visible(Mask(), idx, segment_ids, idx, segment_ids)


def alibi_bias(slopes: jax.Array, q_idx: jax.Array, k_idx: jax.Array) -> jax.Array:
    """ALiBi (Press et al. 2022): [H] slopes, [B, T] and [B, S] indices -> the float32
    score bias -slope_h * (i - j), [B, H, T, S]."""
    distance = (q_idx[:, None, :, None] - k_idx[:, None, None, :]).astype(jnp.float32)
    return -jnp.asarray(slopes, jnp.float32)[None, :, None, None] * distance
