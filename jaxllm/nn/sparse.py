"""DeepSeek Sparse Attention (V3.2-Exp): a lightning indexer scores every earlier key, and
each query attends only to its top-k keys. `docs/references.md`, "DeepSeek Sparse
Attention".

The indexer reads the layer input detached: the LM loss never trains it, and its own loss,
`indexer_loss`, never trains the rest of the model.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import SparseConfig
from jaxllm.nn.kv_cache import write_cache
from jaxllm.nn.linear import Einsum
from jaxllm.nn.masks import Mask, row_indices, visible
from jaxllm.nn.mesh_axes import context_shards
from jaxllm.nn.naive import dot_product_attention


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
            cache, k_idx, k_seg = write_cache(self, positions, key=k)
            k, q_idx, q_seg = cache["key"], positions, jnp.ones_like(positions)
        else:
            q_idx = k_idx = row_indices(segment_ids)
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


class SparseAttention(nn.Module):
    """DeepSeek sparse attention of one layer: each query's top-k keys by a new lightning
    `indexer` ("sparse" stage), or all its visible keys ("dense" warm-up).

    Attention layers run it in their own scope (`AttentionBase`, `nn.share_scope`), so the
    indexer's parameters and cache, and the sown loss, sit under the layer.

    Attributes:
      config: the indexer and the stage.
      dtype: compute dtype of the indexer.
      decode: the indexer scores the keys of its cache (`Indexer`).
    """

    config: SparseConfig
    dtype: jnp.dtype = jnp.float32
    decode: bool = False

    @nn.compact
    def __call__(self, x, q, k, v, *, positions, segment_ids, scale: float | None = None):
        """Queries q [B, T, H, D] of the layer input x [B, T, E] against the layer's keys k and
        values v [B, S, K, D] (the whole cache when decoding) -> [B, T, H, Dv].

        Sows the unweighted indexer loss as "attention_metrics" `indexer_loss`.
        """
        if context_shards() > 1:
            raise ValueError("sparse attention layers do not run context-parallel; "
                             "set mesh.context=1")
        cfg = self.config
        scores = Indexer(heads=cfg.indexer_heads, head_dim=cfg.indexer_head_dim,
                         dtype=self.dtype, decode=self.decode,
                         name="indexer")(x, positions, segment_ids)
        if cfg.stage == "dense":
            out = dot_product_attention(q, k, v, jnp.isfinite(scores), scale=scale)
            loss = indexer_loss(q, k, scores, scale=scale)
        else:
            indices, valid, top = select(scores, cfg.top_k)
            out = sparse_attention(q, k, v, indices, valid, scale=scale)
            loss = indexer_loss(q, k, top, scale=scale, indices=indices)
        self.sow("attention_metrics", "indexer_loss", loss, init_fn=lambda: 0.0,
                 reduce_fn=lambda _, new: new)
        return out
