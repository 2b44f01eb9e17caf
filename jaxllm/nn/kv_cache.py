"""The KV cache of a decoding attention layer, in the layer's "cache" collection. Two writers:
`write_cache`, one slot per token of the text so far, for any layer and any arrays (keys and
values, MLA's latents, the sparse indexer's keys); and `write_ring_cache`, a ring of `window`
slots for sliding-window layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def cache_positions(query_slots: jax.Array, positions: jax.Array, cache_len: int) -> jax.Array:
    """The position each of a row's L cache slots holds, given that its queries [B, T] at
    `positions` go to `query_slots` [T]: slot s holds position s - (slot - position), read
    at the last query (left padding repeats position 0). Slots left of a row's first token
    get negative positions, slots not yet written positions after the query's; masks hide
    both.
    """
    first = query_slots[None, -1:] - positions[:, -1:]  # [B, 1] the slot of position 0
    return jnp.arange(cache_len)[None, :] - first


def write_cache(module: nn.Module, positions: jax.Array, **new: jax.Array):
    """Writes each [B, T, ...] array of `new` into the module's "cache" collection, as
    `cached_<name>` [B, L, ...] (L set by `init`), at the next free slots `cache_index`.

    Returns (the whole cached arrays by name, key positions [B, L], key segment ids [B, L]:
    1 where a slot holds a token of the row, 0 where it holds left padding).
    """
    index = module.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    start, length = index.value, positions.shape[1]
    full = {}
    for name, value in new.items():
        cached = module.variable("cache", f"cached_{name}", jnp.zeros, value.shape, value.dtype)
        updated = jax.lax.dynamic_update_slice_in_dim(cached.value, value, start, axis=1)
        axes = ("act_batch", None, "act_kv_heads", None) if value.ndim == 4 else (
            ("act_batch",) + (None,) * (value.ndim - 1))
        cached.value = nn.with_logical_constraint(updated, axes)
        full[name] = cached.value
    index.value = start + length
    cache_len = next(iter(full.values())).shape[1]
    k_pos = cache_positions(start + jnp.arange(length), positions, cache_len)
    return full, k_pos, (k_pos >= 0).astype(jnp.int32)


def write_ring_cache(module: nn.Module, positions: jax.Array, window: int, **new: jax.Array):
    """The cache of a sliding-window layer: a ring of `window` slots per row, where position
    p lives in slot p mod window, so the cache stays `window` long however long the text.

    Each [B, T, ...] array of `new` is attended to together with the ring's `cached_<name>`
    [B, window, ...]; then its last `window` tokens overwrite their slots (left padding is
    never written). `cached_positions` [B, window] holds each slot's position plus one, so
    that a zeroed cache (`jaxllm.infer.init_cache`) is empty, and `cache_index` counts the
    slots of the unbounded cache, as in `write_cache`.

    Returns (the ring and the new arrays joined along the length, by name; their positions
    [B, window + T]; segment ids: 1 for real tokens, 0 for empty slots and padding).
    """
    index = module.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    batch, length = positions.shape
    new_slots = index.value + jnp.arange(length)
    new_pos = new_slots[None] - (new_slots[-1] - positions[:, -1:])  # left padding: < 0
    ring_pos = module.variable("cache", "cached_positions",
                               lambda: jnp.zeros((batch, window), jnp.int32))
    k_pos = jnp.concatenate([ring_pos.value - 1, new_pos], axis=1)
    written = (new_pos >= 0) & (jnp.arange(length) >= length - window)
    slots = jnp.where(written, new_pos % window, window)  # slot `window` is dropped
    rows = jnp.arange(batch)[:, None]
    joined = {}
    for name, value in new.items():
        ring = module.variable("cache", f"cached_{name}", jnp.zeros,
                               (batch, window, *value.shape[2:]), value.dtype)
        joined[name] = jnp.concatenate([ring.value, value], axis=1)
        ring.value = ring.value.at[rows, slots].set(value, mode="drop")
    ring_pos.value = ring_pos.value.at[rows, slots].set(new_pos + 1, mode="drop")
    index.value = index.value + length
    return joined, k_pos, (k_pos >= 0).astype(jnp.int32)
