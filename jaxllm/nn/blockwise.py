"""Blockwise (flash-style) attention in pure JAX: O(S * block) activation memory.

The row is cut into n blocks of `block` tokens. Query block i and key block i - d (mod n)
form diagonal d; one step computes a whole diagonal as a batch of n [block, block] score
tiles and merges it into every query block's softmax state with the online softmax in
float32 (`online_softmax`; `docs/references.md`, "Ring attention"). The tiles that wrap
around hold keys after their queries, which the causal mask hides. A mask reaches only some
diagonals:

- global: all n diagonals, in a `lax.scan` that reuses one step's buffers (XLA's
  `cost_analysis()` counts a scan body once, so it shows one diagonal's FLOPs);
- sliding (window w) and chunked (chunk c): the diagonals within w (or c) tokens;
- strided: the sliding diagonals, plus the S/stride strided keys gathered into dense key
  blocks that every query block meets, so compute scales like S * (w + S/stride).

Local masks unroll their few steps, so `cost_analysis()` counts every FLOP. A step's scores
are [S, block] per head. The backward is a custom VJP that recomputes each tile from the
saved log-sum-exp, as flash attention does."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.nn import online_softmax
from jaxllm.nn.masks import Mask

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static settings: the mask, ALiBi slopes per (kv head, group), scale and block size."""

    mask: Mask
    slopes: tuple[tuple[float, ...], ...] | None
    scale: float
    block: int


@dataclasses.dataclass(frozen=True)
class _Step:
    """One step: diagonal `diagonal` of the row's tiles, or (gathered=True) key block
    `diagonal` of the strided keys against every query block. `near` keeps the keys less
    than the window behind the query (True), at least that far (False), or all (None)."""

    diagonal: int
    gathered: bool = False
    near: bool | None = None


def blockwise_attention(q, k, v, segment_ids, *, mask: Mask = Mask(), slopes=None,
                        scale: float | None = None, block_size: int = 128):
    """Self-attention of a row of S tokens at indices 0..S-1; equals the naive kernel.

    Args:
      q: [B, S, H, D] queries; k: [B, S, K, D] keys; v: [B, S, K, Dv] values; K divides H.
      segment_ids: [B, S] packed-document ids; attention never crosses them.
      mask: which earlier keys each query sees.
      slopes: [H] ALiBi slopes, or None.
      scale: the softmax scale; default D ** -0.5.
      block_size: tokens per query and key block; must divide S.

    Returns:
      [B, S, H, Dv] in q's dtype.
    """
    length, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    block = min(block_size, length)
    if length % block:
        raise ValueError(f"sequence length {length} must be a multiple of block_size {block}")
    if slopes is not None:
        grouped = np.asarray(slopes, np.float32).reshape(kv_heads, heads // kv_heads)
        slopes = tuple(tuple(float(s) for s in row) for row in grouped)
    plan = _Plan(mask=mask, slopes=slopes, block=block,
                 scale=q.shape[-1] ** -0.5 if scale is None else scale)
    return _attention(plan, q, k, v, segment_ids)


def _steps(plan: _Plan, length: int) -> list[_Step]:
    """The diagonals (and strided key blocks) that `plan.mask` can reach."""
    mask, block, n = plan.mask, plan.block, length // plan.block

    def diagonals(reach: int, near=None) -> list[_Step]:
        last = min(n - 1, (reach + block - 2) // block)
        return [_Step(d, near=near) for d in range(last + 1)]

    if mask.kind == "global":
        return diagonals(length)
    if mask.kind == "sliding":
        return diagonals(mask.window)
    if mask.kind == "chunked":
        return diagonals(mask.chunk)
    if mask.kind == "strided":
        gathered = -(-_strided_count(plan, length) // block)
        return diagonals(mask.window, near=True) + [
            _Step(j, gathered=True, near=False) for j in range(gathered)]
    raise ValueError(f"blockwise attention has no plan for mask kind {mask.kind!r}")


def _strided_count(plan: _Plan, length: int) -> int:
    return length // plan.mask.stride


def _strided(plan: _Plan, x):
    """The keys at index stride-1 mod stride: [B, S, ...] -> [B, S/stride, ...]."""
    return x[:, plan.mask.stride - 1::plan.mask.stride]


def _blocks(x, block: int):
    """[B, S, ...] -> [n, B, block, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _unblocks(x):
    """Inverse of `_blocks`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


@dataclasses.dataclass(frozen=True)
class _Row:
    """The row in blocks: grouped queries [n, B, b, K, G, D], keys and values
    [n, B, b, K, D], segment ids [n, B, b], indices [n, b]; and the strided keys' blocks."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    seg: jax.Array
    idx: jax.Array
    strided: tuple | None  # (k, v, seg, idx) blocks of the strided keys


def _row(plan: _Plan, q, k, v, seg) -> _Row:
    length, kv_heads = q.shape[1], k.shape[2]
    idx = jnp.arange(length)
    strided = None
    if plan.mask.kind == "strided":
        count = _strided_count(plan, length)
        pad = -(-count // plan.block) * plan.block - count  # padding keys get segment -1
        sk, sv = (jnp.pad(_strided(plan, x), [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (k, v))
        s_seg = jnp.pad(_strided(plan, seg), [(0, 0), (0, pad)], constant_values=-1)
        s_idx = jnp.pad(idx[plan.mask.stride - 1::plan.mask.stride], (0, pad))
        strided = (*(_blocks(x, plan.block) for x in (sk, sv, s_seg)),
                   s_idx.reshape(-1, plan.block))
    q = online_softmax.group_heads(q, kv_heads)
    q, k, v, seg = (_blocks(x, plan.block) for x in (q, k, v, seg))
    return _Row(q=q, k=k, v=v, seg=seg, idx=idx.reshape(-1, plan.block), strided=strided)


def _tiles(row: _Row, diagonal, gathered: bool):
    """(keys, values, key segment ids, key indices) that meet the n query blocks in one
    step, each with a leading n axis: key blocks i - d (wrapping around, into keys after the
    queries that the causal mask hides), or strided key block `diagonal` for every query."""
    if not gathered:
        return tuple(jnp.roll(x, diagonal, axis=0) for x in (row.k, row.v, row.seg, row.idx))
    n = row.q.shape[0]
    return tuple(jnp.broadcast_to(x[diagonal], (n, *x.shape[1:])) for x in row.strided)


def _scores(plan: _Plan, near: bool | None, q, k, q_idx, q_seg, k_idx, k_seg):
    """Scaled float32 scores [n, B, K, G, t, s] of a step's tiles with the ALiBi bias,
    -inf where masked."""
    s = jnp.einsum("nbtkgd,nbskd->nbkgts", q, k, preferred_element_type=_F32) * plan.scale
    distance = q_idx[:, :, None] - k_idx[:, None, :]  # [n, t, s]
    if plan.slopes is not None:
        slopes = jnp.asarray(plan.slopes, _F32)[None, None, :, :, None, None]
        s = s - slopes * distance[:, None, None, None].astype(_F32)
    allowed = plan.mask.allows(q_idx[:, :, None], k_idx[:, None, :])
    if near is not None:
        close = distance < plan.mask.window
        allowed = allowed & (close if near else ~close)
    allowed = allowed[:, None] & (q_seg[..., :, None] == k_seg[..., None, :])  # [n, B, t, s]
    return jnp.where(allowed[:, :, None, None], s, -jnp.inf)


def _run(plan: _Plan, length: int, update, carry):
    """Applies `update(carry, diagonal, gathered, near)` for every step of the plan: a
    scan over the n diagonals of a global mask (one step's buffers, reused), otherwise an
    unrolled loop over the few steps a local mask needs, every FLOP visible to XLA."""
    if plan.mask.kind == "global":
        step = lambda c, d: (update(c, d, False, None), None)  # noqa: E731
        return jax.lax.scan(step, carry, jnp.arange(length // plan.block))[0]
    for s in _steps(plan, length):
        carry = update(carry, s.diagonal, s.gathered, s.near)
    return carry


def _forward(plan: _Plan, q, k, v, seg):
    """(out [B, S, H, Dv], lse [n, B, K, G, b])."""
    row = _row(plan, q, k, v, seg)

    def update(state, diagonal, gathered, near):
        k_t, v_t, k_seg, k_idx = _tiles(row, diagonal, gathered)
        s = _scores(plan, near, row.q, k_t, row.idx, row.seg, k_idx, k_seg)
        return online_softmax.merge(state, s, v_t)

    state = online_softmax.initial_state(row.q, v.shape[-1])
    out, lse = online_softmax.finalize(_run(plan, q.shape[1], update, state))
    out = _unblocks(out.transpose(0, 1, 4, 2, 3, 5))  # [n, B, K, G, t, Dv] -> [B, S, K, G, Dv]
    return out.reshape(*q.shape[:3], v.shape[-1]).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: _Plan, q, k, v, seg):
    return _forward(plan, q, k, v, seg)[0]


def _attention_fwd(plan: _Plan, q, k, v, seg):
    out, lse = _forward(plan, q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _attention_bwd(plan: _Plan, residuals, d_out):
    q, k, v, seg, out, lse = residuals
    row = _row(plan, q, k, v, seg)
    do, o = (_blocks(online_softmax.group_heads(x, k.shape[2]), plan.block)
             for x in (d_out, out))
    delta = online_softmax.output_delta(do, o)
    zeros = lambda x: jnp.zeros(x.shape, _F32)  # noqa: E731
    strided = row.strided and (zeros(row.strided[0]), zeros(row.strided[1]))
    grads = (zeros(row.q), zeros(row.k), zeros(row.v), strided)

    def update(grads, diagonal, gathered, near):
        dq, dk, dv, strided = grads
        k_t, v_t, k_seg, k_idx = _tiles(row, diagonal, gathered)
        s = _scores(plan, near, row.q, k_t, row.idx, row.seg, k_idx, k_seg)
        d_q, d_k, d_v = online_softmax.block_grads(s, lse, delta, row.q, k_t, v_t, do,
                                                   plan.scale)
        dq = dq + d_q
        if gathered:
            sk, sv = strided
            return dq, dk, dv, (sk.at[diagonal].add(d_k.sum(0)), sv.at[diagonal].add(d_v.sum(0)))
        back = lambda x: jnp.roll(x, -diagonal, axis=0)  # noqa: E731  (to the keys' blocks)
        return dq, dk + back(d_k), dv + back(d_v), strided

    dq, dk, dv, strided = _run(plan, q.shape[1], update, grads)
    dk, dv = _unblocks(dk), _unblocks(dv)
    if strided:  # the strided keys' share goes back to their places
        count = _strided_count(plan, q.shape[1])
        every = slice(plan.mask.stride - 1, None, plan.mask.stride)
        dk = dk.at[:, every].add(_unblocks(strided[0])[:, :count])
        dv = dv.at[:, every].add(_unblocks(strided[1])[:, :count])
    dq = _unblocks(dq).reshape(q.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
