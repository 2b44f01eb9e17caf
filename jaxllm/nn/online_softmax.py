"""The online softmax of flash-style attention (`docs/references.md`, "Ring attention"),
shared by the blockwise and ring kernels: key blocks merge one at a time into a float32
state, finalised into outputs and log-sum-exp, and the backward recomputes each block's
probabilities from that log-sum-exp instead of saving them.

Layouts, with any leading axes `...` (none, or the blocks of a row): grouped queries
[..., t, K, G, D] (G = H / K query heads share each of the K kv heads); keys and values
[..., s, K, D]; scores [..., K, G, t, s]; the running max m, denominator l and
log-sum-exp [..., K, G, t]; the numerator acc [..., K, G, t, Dv].
"""

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def group_heads(x, kv_heads: int):
    """[B, S, H, D] -> [B, S, K, H/K, D]: query head h in group h // (H / K)."""
    batch, length, heads, dim = x.shape
    return x.reshape(batch, length, kv_heads, heads // kv_heads, dim)


def initial_state(q, width: int):
    """(m, l, acc) of grouped queries q that have seen no key yet; acc `width` wide."""
    *lead, length, kv_heads, groups, _ = q.shape
    m = jnp.full((*lead, kv_heads, groups, length), -jnp.inf, _F32)
    return m, jnp.zeros_like(m), jnp.zeros((*m.shape, width), _F32)


def merge(state, scores, v):
    """(m, l, acc) updated with one key block: its scaled float32 `scores` (-inf where
    masked) and values v."""
    m, l, acc = state
    # The result does not depend on the max, so autodiff need not see it.
    m_new = jax.lax.stop_gradient(jnp.maximum(m, scores.max(-1)))
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # rows with nothing visible yet
    p = jnp.exp(scores - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    pv = jnp.einsum("...kgts,...skd->...kgtd", p.astype(v.dtype), v,
                    preferred_element_type=_F32)
    return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv


def merge_attended(state, out, lse):
    """(m, l, acc) updated with one key block that another kernel attended: its float32
    outputs `out` [..., K, G, t, Dv] and log-sum-exp `lse` (-inf where no key is visible)."""
    m, l, acc = state
    m_new = jnp.maximum(m, lse)
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    alpha, beta = jnp.exp(m - m_safe), jnp.exp(lse - m_safe)
    return m_new, alpha * l + beta, alpha[..., None] * acc + beta[..., None] * out


def finalize(state):
    """(m, l, acc) -> (float32 outputs [..., K, G, t, Dv], log-sum-exp [..., K, G, t]).

    The log-sum-exp is +inf for a query that sees no key, so the backward's
    exp(s - lse) is 0 there; its output is 0.
    """
    m, l, acc = state
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    lse = jnp.where(l > 0, jnp.where(jnp.isneginf(m), 0.0, m) + jnp.log(l), jnp.inf)
    return out, lse


def output_delta(d_out, out):
    """rowsum(dO * O) [..., K, G, t] of grouped output gradients and outputs."""
    return jnp.einsum("...tkgd,...tkgd->...kgt", d_out, out, preferred_element_type=_F32)


def block_grads(scores, lse, delta, q, k, v, d_out, scale: float):
    """One (query block, key block) pair's float32 shares of (dq, dk, dv), as in
    FlashAttention: P = exp(S - lse), dS = P * (dO V^T - delta), from the pair's
    recomputed scaled `scores` (-inf where masked) and the softmax `scale`."""
    p = jnp.exp(scores - lse[..., None])
    dv = jnp.einsum("...kgts,...tkgd->...skd", p, d_out, preferred_element_type=_F32)
    dp = jnp.einsum("...tkgd,...skd->...kgts", d_out, v, preferred_element_type=_F32)
    ds = p * (dp - delta[..., None]) * scale
    dq = jnp.einsum("...kgts,...skd->...tkgd", ds, k, preferred_element_type=_F32)
    dk = jnp.einsum("...kgts,...tkgd->...skd", ds, q, preferred_element_type=_F32)
    return dq, dk, dv
