"""The naive attention kernel: the whole [B, H, T, S] score matrix under an explicit mask. It
takes any mask (decoding's included), and the other kernels equal it."""

import functools

import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          bias: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Softmax attention over all keys, with query heads grouped over the kv heads.

    Args:
      q: [B, T, H, D] queries.
      k: [B, S, K, D] keys; v: [B, S, K, Dv] values; K divides H (K == H: MHA, K == 1: MQA).
      mask: [B, T, S] booleans, True where a query may attend to a key.
      bias: [B, H, T, S] float32 added to the scores (ALiBi), or None.
      scale: the softmax scale; default D ** -0.5.

    Returns:
      [B, T, H, Dv]. Scores and softmax are computed in float32.

    The G = H / K query heads of a group are folded into the query axis, so that every
    product is a plain [B, K] batch of [G*T, D] x [D, S] matrix products: no key or value
    is copied per query head, and no product carries a small group axis.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, groups * length, head_dim)
    mask = jnp.tile(mask[:, None], (1, 1, groups, 1))
    if bias is not None:
        bias = bias.reshape(bias.shape[0], kv_heads, groups * length, bias.shape[-1])
    scale = head_dim**-0.5 if scale is None else scale
    out = _attention(scale, q, k, v, mask, bias)
    out = out.reshape(batch, kv_heads, groups, length, -1).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, length, heads, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(scale, q, k, v, mask, bias):
    """q [B, K, Q, D], k [B, S, K, D], v [B, S, K, Dv], mask [B, K, Q, S], bias [B, K, Q, S]
    or None -> [B, K, Q, Dv]."""
    return _attention_fwd(scale, q, k, v, mask, bias)[0]


def _attention_fwd(scale, q, k, v, mask, bias):
    scores = jnp.einsum("bkqd,bskd->bkqs", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkqs,bskd->bkqd", probs.astype(v.dtype), v)
    return out, (q, k, v, probs, out)


def _attention_bwd(scale, residuals, d_out):
    """The gradient from the saved probabilities P, as in FlashAttention:
    dS = P * (dO V^T - rowsum(dO * O)), with no pass back through the softmax."""
    q, k, v, probs, out = residuals
    d_v = jnp.einsum("bkqs,bkqd->bskd", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("bkqd,bskd->bkqs", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.einsum("bkqd,bkqd->bkq", d_out, out, preferred_element_type=jnp.float32)
    d_scores = (probs * (d_probs - row[..., None]) * scale).astype(q.dtype)
    d_q = jnp.einsum("bkqs,bskd->bkqd", d_scores, k)
    d_k = jnp.einsum("bkqs,bkqd->bskd", d_scores, q)
    return d_q, d_k, d_v, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
