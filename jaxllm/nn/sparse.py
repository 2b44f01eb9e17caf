"""DeepSeek Sparse Attention (V3.2-Exp): a lightning indexer scores every earlier key, and
each query attends only to its top-k keys. `../shared/REFERENCES.md`, "DeepSeek Sparse
Attention".

The indexer reads the layer input detached: the LM loss never trains it, and its own loss,
`indexer_loss`, never trains the rest of the model.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.nn import attention  # a module import: attention.py imports this one
from jaxllm.nn.linear import Einsum
from jaxllm.nn.masks import Mask, visible


class Indexer(nn.Module):
    """The lightning indexer: I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]), with `heads`
    query heads q [B, T, heads, head_dim], one key k [B, S, head_dim] per token and
    per-head weights w [B, T, heads], all from the detached layer input.

    decode: score the keys of a cache, `cached_key` [B, L, head_dim] (`write_cache`).
    """

    heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x [B, T, E], positions and segment_ids [B, T] -> float32 scores [B, T, S], -inf
        at the keys a query may not see (causal, same segment; S = L when decoding)."""
        x = jax.lax.stop_gradient(x)
        embed = x.shape[-1]

        def project(shape, equation, name):
            return Einsum((embed, *shape), ("embed",) + (None,) * len(shape), equation,
                          dtype=self.dtype, name=name)(x)

        q = project((self.heads, self.head_dim), "bte,ehd->bthd", "query")
        k = project((self.head_dim,), "bse,ed->bsd", "key")
        w = project((self.heads,), "bte,eh->bth", "weights")
        if self.decode:
            cache, k_idx, k_seg = attention.write_cache(self, positions, key=k)
            k, q_idx, q_seg = cache["key"], positions, jnp.ones_like(positions)
        else:
            q_idx = k_idx = attention.row_indices(segment_ids)
            q_seg = k_seg = segment_ids
        dots = jnp.einsum("bthd,bsd->bths", q, k, preferred_element_type=jnp.float32)
        scores = jnp.einsum("bth,bths->bts", w.astype(jnp.float32), jax.nn.relu(dots))
        return jnp.where(visible(Mask(), q_idx, q_seg, k_idx, k_seg), scores, -jnp.inf)


def select(scores: jax.Array, top_k: int):
    """scores [B, T, S] -> the top min(top_k, S) keys of each query: (indices [B, T, k],
    valid [B, T, k]: False where a query sees fewer than k keys, their scores [B, T, k])."""
    top, indices = jax.lax.top_k(scores, min(top_k, scores.shape[-1]))
    return indices, top > -jnp.inf, top


def gather(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x [B, S, ...], indices [B, T, k] -> each query's selected rows [B, T, k, ...]."""
    return jax.vmap(lambda rows, idx: rows[idx])(x, indices)


def attention_probs(q, k, allowed, scale: float | None = None) -> jax.Array:
    """Float32 softmax probabilities [B, T, K, G, S] of queries q [B, T, H, D] (H = K * G)
    over keys shared by all queries, k [B, S, K, D], or per query, k [B, T, S, K, D],
    where `allowed` [B, T, S]; scale defaults to D ** -0.5."""
    batch, length, heads, head_dim = q.shape
    q = q.reshape(batch, length, k.shape[-2], heads // k.shape[-2], head_dim)
    spec = "btkgd,bskd->btkgs" if k.ndim == 4 else "btkgd,btskd->btkgs"
    scale = head_dim**-0.5 if scale is None else scale
    scores = jnp.einsum(spec, q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed[:, :, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def sparse_attention(q, k, v, indices, valid, scale: float | None = None) -> jax.Array:
    """Queries q [B, T, H, D] attend only to their selected keys: k [B, S, K, D] and
    v [B, S, K, Dv] at `indices` [B, T, k] where `valid` -> [B, T, H, Dv]. The selected
    keys and values are gathered per query, so the cost is O(T * k), not O(T * S)."""
    probs = attention_probs(q, gather(k, indices), valid, scale)
    out = jnp.einsum("btkgs,btskd->btkgd", probs.astype(v.dtype), gather(v, indices))
    return out.reshape(*q.shape[:3], -1)


def indexer_loss(q, k, scores, scale: float | None = None, indices=None) -> jax.Array:
    """The indexer's KL loss, mean_{b, t} KL(p_t || softmax(I_t)): the sum over keys for each
    query, averaged over all B * T query tokens (padding included).

    p_t is the main attention of query t (q [B, T, H, D], k [B, S, K, D], both detached)
    summed over heads and L1-normalised. Dense stage: over the keys of scores I [B, T, S]
    that are finite (visible). Sparse stage, with `indices` [B, T, k]: over the selected
    keys, scores [B, T, k] their indexer scores (-inf where not valid).
    """
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    if indices is not None:
        k = gather(k, indices)
    p = attention_probs(q, k, jnp.isfinite(scores), scale).sum(axis=(2, 3))
    p = p / p.sum(axis=-1, keepdims=True)
    log_q = jax.nn.log_softmax(scores, axis=-1)
    kl = jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0)
    return kl.sum(axis=-1).mean()


def indexed_attention(module: nn.Module, x, q, k, v, positions, segment_ids, scale=None):
    """DeepSeek sparse attention inside an attention module's compact `__call__` (whose
    `sparse`, `dtype`, `decode` and `position` fields it reads): each query's top-k keys by
    the module's new `indexer` ("sparse" stage), or all its visible keys ("dense" warm-up).
    k and v [B, S, K, D] are the layer's keys and values (the whole cache when decoding).
    Sows the unweighted indexer loss as "attention_metrics" `indexer_loss`."""
    cfg = module.sparse
    if module.position == "alibi":
        raise ValueError("sparse attention layers take RoPE or no positions, not ALiBi")
    if attention.context_shards() > 1:
        raise ValueError("sparse attention layers do not run context-parallel; set mesh.context=1")
    scores = Indexer(cfg.indexer_heads, cfg.indexer_head_dim, module.dtype, module.decode,
                     name="indexer")(x, positions, segment_ids)
    if cfg.stage == "dense":
        out = attention.dot_product_attention(q, k, v, jnp.isfinite(scores), scale=scale)
        loss = indexer_loss(q, k, scores, scale)
    else:
        indices, valid, top = select(scores, cfg.top_k)
        out = sparse_attention(q, k, v, indices, valid, scale)
        loss = indexer_loss(q, k, top, scale, indices)
    module.sow("attention_metrics", "indexer_loss", loss, init_fn=lambda: 0.0,
               reduce_fn=lambda _, new: new)
    return out
