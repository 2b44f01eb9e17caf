"""DeepSeek Sparse Attention (V3.2-Exp): a lightning indexer scores every earlier key, and
each query attends only to its top-k keys. `docs/references.md`, "DeepSeek Sparse
Attention".

The indexer reads the layer input detached: the LM loss never trains it, and its own loss,
the KL of `indexer_kl`, never trains the rest of the model.

Training and prefill run in blocks of `query_block` queries (`SparseAttention`): a block's
indexer scores, its top-k keys as a mask over all S keys, and its attention, so memory is
O(query_block x S) whatever the length. A one-token decoding step gathers its top-k keys
instead (`sparse_attention`), O(k) per token.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import SparseConfig
from jaxllm.nn.kv_cache import write_cache
from jaxllm.nn.linear import Einsum
from jaxllm.nn.masks import Mask, row_indices, visible
from jaxllm.nn.mesh_axes import context_shards


class Indexer(nn.Module):
    """The lightning indexer's inputs from the detached layer input: query heads q
    [B, T, heads, head_dim], one key k [B, S, head_dim] per token and per-head weights
    w [B, T, heads], and which keys each query may see. `index_scores` scores them.

    decode: the keys are those of a cache, `cached_key` [B, L, head_dim] (`write_cache`).
    """

    heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array):
        """x [B, T, E], positions and segment_ids [B, T] -> (q, w, k, visible [B, T, S]:
        causal and same segment; S = L when decoding)."""
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
        return q, w, k, visible(Mask(), q_idx, q_seg, k_idx, k_seg)


def index_scores(q, w, k, allowed) -> jax.Array:
    """I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]) of the `Indexer`'s q [B, T, h, d],
    w [B, T, h] and k [B, S, d] -> float32 [B, T, S], -inf where not `allowed`."""
    dots = jnp.einsum("bthd,bsd->bths", q, k, preferred_element_type=jnp.float32)
    scores = jnp.einsum("bth,bths->bts", w.astype(jnp.float32), jax.nn.relu(dots))
    return jnp.where(allowed, scores, -jnp.inf)


def select(scores: jax.Array, top_k: int):
    """scores [B, T, S] -> the top min(top_k, S) keys of each query: (indices [B, T, k],
    valid [B, T, k]: False where a query sees fewer than k keys, their scores [B, T, k])."""
    top, indices = jax.lax.top_k(scores, min(top_k, scores.shape[-1]))
    return indices, top > -jnp.inf, top


def keep_top_k(scores: jax.Array, top_k: int) -> jax.Array:
    """scores [B, T, S] with -inf everywhere but at each query's top-k keys (`select`)."""
    indices, valid, _ = select(scores, top_k)
    kept = jnp.put_along_axis(jnp.zeros(scores.shape, bool), indices, valid, axis=-1,
                              inplace=False)
    return jnp.where(kept, scores, -jnp.inf)


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


def indexer_kl(probs: jax.Array, scores: jax.Array) -> jax.Array:
    """Per query [B, T], KL(p_t || softmax(I_t)) over the keys where the indexer scores I
    [B, T, S] are finite: p_t is the main attention `probs` [B, T, K, G, S] (detached)
    summed over heads and L1-normalised."""
    p = jax.lax.stop_gradient(probs).sum(axis=(2, 3))
    p = p / p.sum(axis=-1, keepdims=True)
    log_q = jax.nn.log_softmax(scores, axis=-1)
    kl = jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0)
    return kl.sum(axis=-1)


def blocks(x: jax.Array, size: int) -> jax.Array:
    """[B, T, ...] -> [T / size, B, size, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, size, *x.shape[2:]), 1, 0)


def unblock(x: jax.Array) -> jax.Array:
    """The inverse of `blocks`."""
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def blockwise_attention(q, k, v, index, *, top_k: int | None, query_block: int,
                        scale: float | None = None):
    """Queries q [B, T, H, D] against keys k [B, S, K, D] and values v [B, S, K, Dv], each
    seeing its top_k keys by the indexer (all its visible keys when top_k is None), in
    blocks of `query_block` queries under `jax.checkpoint`. `index` is the `Indexer`'s
    (q, w, k, visible). -> (out [B, T, H, Dv], the `indexer_kl` of each query [B, T])."""
    ik = index[2]

    @jax.checkpoint
    def block(inputs):
        q, iq, w, allowed = inputs
        scores = index_scores(iq, w, ik, allowed)
        if top_k is not None:
            scores = keep_top_k(scores, top_k)
        probs = attention_probs(q, k, jnp.isfinite(scores), scale)
        out = jnp.einsum("btkgs,bskd->btkgd", probs.astype(v.dtype), v)
        return out.reshape(*q.shape[:3], -1), indexer_kl(probs, scores)

    length = q.shape[1]
    size = min(length, query_block)
    pad = -length % size

    def padded(a, fill):
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)

    # Padding queries see every key, so their softmaxes stay finite; they are dropped.
    iq, w, _, allowed = index
    inputs = (padded(q, 0), padded(iq, 0), padded(w, 0), padded(allowed, True))
    out, kl = jax.lax.map(block, tuple(blocks(a, size) for a in inputs))
    return unblock(out)[:, :length], unblock(kl)[:, :length]


class SparseAttention(nn.Module):
    """DeepSeek sparse attention of one layer: each query's top-k keys by a new lightning
    `indexer` ("sparse" stage), or all its visible keys ("dense" warm-up).

    Attention layers run it in their own scope (`AttentionBase`, `nn.share_scope`), so the
    indexer's parameters and cache, and the sown loss, sit under the layer.

    Attributes:
      config: the indexer, the stage and the query block.
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

        Sows the unweighted indexer loss, KL(p_t || softmax(I_t)) summed over keys and
        averaged over all B * T queries (padding included), as "attention_metrics"
        `indexer_loss`; a one-token decoding step sows none.
        """
        if context_shards() > 1:
            raise ValueError("sparse attention layers do not run context-parallel; "
                             "set mesh.context=1")
        cfg = self.config
        index = Indexer(heads=cfg.indexer_heads, head_dim=cfg.indexer_head_dim,
                        dtype=self.dtype, decode=self.decode,
                        name="indexer")(x, positions, segment_ids)
        sparse = cfg.stage == "sparse"
        if self.decode and sparse and q.shape[1] == 1:
            indices, valid, _ = select(index_scores(*index), cfg.top_k)
            return sparse_attention(q, k, v, indices, valid, scale=scale)

        out, kl = blockwise_attention(q, k, v, index, scale=scale,
                                      top_k=cfg.top_k if sparse else None,
                                      query_block=cfg.query_block)
        self.sow("attention_metrics", "indexer_loss", kl.mean(), init_fn=lambda: 0.0,
                 reduce_fn=lambda _, new: new)
        return out
