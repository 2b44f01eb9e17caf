"""Context parallelism: ring attention, and the all-gather baseline.

The sequence axis is split over the `context` mesh axis into n shards. In `ring_attention` each
device keeps its queries and passes its K/V block (with the block's positions and segment ids)
to device (i+1) mod n with `jax.lax.ppermute`; after n steps every query has met every key.
Blocks are merged with the online softmax in float32 (`online_softmax`; `docs/references.md`,
"Ring attention"), so per-device activation memory is O(S/n).

Masks come from the true positions and segment ids that travel with the tokens, so any token
order works; `context_order` provides the load-balanced ones (zigzag, striped). Each local block
is cut into `chunks` query and key chunks, and a chunk pair whose mask is all False skips its
compute under `lax.cond`. Under a causal mask, the zigzag order with chunks=2 halves the work of
every off-diagonal step and gives every device the same 2n+1 chunk pairs (`active_blocks`).

Backward: a custom VJP that recomputes the scores chunk by chunk from the saved log-sum-exp
and passes dK/dV around the ring with their K/V, as flash attention does. It keeps O(S/n)
residuals per device, where autodiff through the scan (`custom_vjp=False`) saves every step's
probabilities, O(S^2/n) per device (`benchmarks/ring.py` compares the two).

On a TPU target each chunk pair whose mask splash attention's static masks express runs
through that Pallas kernel, forward and backward (`ring_splash`); `block_kernel` chooses.

`jax.shard_map` runs with check_vma=False: the softmax state starts as device-invariant
constants and turns device-varying in the first merge, which the vma checker rejects as a
mismatch between the branches of `lax.cond` and the carries of `lax.scan`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxllm.nn import online_softmax, ring_splash
from jaxllm.nn.masks import Mask, visible
from jaxllm.nn.mesh_axes import batch_and_head_axes
from jaxllm.nn.platform import target_platform
from jaxllm.parallel import CONTEXT

BLOCK_KERNELS = ("jax", "splash")
_F32 = jnp.float32


def ring_mask(*, causal: bool, window: int | None) -> Mask:
    """The mask of `ring_attention`'s causal and window arguments: with a window w, a causal
    query sees the w keys ending at itself, a non-causal one the keys less than w positions
    away."""
    if not causal:
        return Mask("bidirectional", window=window or 0)
    return Mask() if window is None else Mask("sliding", window=window)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static settings of one ring: the mesh axis, the mask, chunks per local block, and whether
    chunk pairs run splash attention (in Pallas interpret mode)."""

    axis: str
    mask: Mask
    chunks: int
    splash: bool = False
    interpret: bool = False


def ring_attention(
    q, k, v, positions, segment_ids, *, causal: bool = True, window: int | None = None,
    chunks: int = 2, mesh=None, axis_name: str = CONTEXT, custom_vjp: bool = True,
    block_kernel: str | None = None,
):
    """Ring attention over the `axis_name` mesh axis; equals full attention on the same tokens.

    Args:
      q: [B, S, H, D] queries; k, v: [B, S, K, D] keys and values, K divides H. Sequence axis
        in context order (`context_order.to_context_order`), split over `axis_name`.
      positions, segment_ids: [B, S] true positions and packed-document ids, in the same order.
      causal, window: the mask (`ring_mask`).
      chunks: query and key chunks per local block; empty chunk pairs skip their compute.
      mesh: the mesh; default the current one (`jax.set_mesh`). Batch splits over its data and
        fsdp axes when they divide it, heads over tensor when it divides both head counts.
      custom_vjp: the ring backward (O(S/n) memory); False differentiates through the scan.
      block_kernel: a chunk pair's attention: "jax", or "splash" where splash's static masks
        express the pair's mask (`ring_splash`; Pallas interpret mode off TPU). Default splash
        on a TPU target where it runs (custom_vjp, chunks of a multiple of 128 tokens).

    Returns:
      [B, S, H, D] in q's dtype.
    """
    mesh = _resolve_mesh(mesh, axis_name)
    n = mesh.shape[axis_name]
    _check_shapes(q, k, v, positions, segment_ids, n * chunks)
    splash = _use_splash(block_kernel, q.shape[1] // (n * chunks), custom_vjp)
    ring = _Ring(axis=axis_name, mask=ring_mask(causal=causal, window=window), chunks=chunks,
                 splash=splash, interpret=target_platform() != "tpu")
    layout = _layout(mesh, axis_name, q.shape, k.shape[2])
    if custom_vjp:
        return _ring_attention_vjp(ring, layout, q, k, v, positions, segment_ids)
    forward = layout.map(functools.partial(_ring_forward, ring), layout.inputs,
                         (layout.heads, layout.lse))
    return forward(q, k, v, positions, segment_ids)[0]


def _use_splash(block_kernel: str | None, chunk: int, custom_vjp: bool) -> bool:
    """Whether chunk pairs of `chunk` tokens run splash (`ring_attention`'s block_kernel)."""
    if block_kernel not in (None, *BLOCK_KERNELS):
        raise ValueError(f"block_kernel must be one of {BLOCK_KERNELS} or None; got "
                         f"{block_kernel!r}")
    reason = ring_splash.unsupported(chunk, custom_vjp=custom_vjp)
    if block_kernel is None:
        return reason is None and target_platform() == "tpu"
    if block_kernel == "splash" and reason:
        raise ValueError(reason)
    return block_kernel == "splash"


def all_gather_attention(
    q, k, v, positions, segment_ids, *, causal: bool = True, window: int | None = None,
    mesh=None, axis_name: str = CONTEXT,
):
    """Context-parallel baseline: queries stay sharded, K/V are all-gathered over `axis_name`.

    Same arguments and result as `ring_attention`; O(S) K/V and O(S^2/n) scores per device,
    computed by `jax.nn.dot_product_attention` and differentiated by autodiff.
    """
    mesh = _resolve_mesh(mesh, axis_name)
    _check_shapes(q, k, v, positions, segment_ids, mesh.shape[axis_name])
    mask = ring_mask(causal=causal, window=window)

    def local(q, k, v, pos, seg):
        k, v, k_pos, k_seg = jax.lax.all_gather((k, v, pos, seg), axis_name, axis=1, tiled=True)
        allowed = visible(mask, pos, seg, k_pos, k_seg)
        return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None])

    layout = _layout(mesh, axis_name, q.shape, k.shape[2])
    return layout.map(local, layout.inputs, layout.heads)(q, k, v, positions, segment_ids)


def active_blocks(positions, segment_ids, n: int, *, causal: bool = True,
                  window: int | None = None, chunks: int = 2) -> np.ndarray:
    """[n] chunk pairs each device computes in `ring_attention` (the others are skipped).

    Replays the ring on the host with the kernel's mask: at step s device r holds the K/V of
    device (r - s) mod n, and a (query chunk, key chunk) pair counts when any entry is visible.
    """
    ring = ring_mask(causal=causal, window=window)
    shards = [np.split(np.asarray(x), n * chunks, axis=1) for x in (positions, segment_ids)]
    pos, seg = ([parts[r * chunks:(r + 1) * chunks] for r in range(n)] for parts in shards)
    counts = np.zeros(n, np.int64)
    for r in range(n):
        for step in range(n):
            src = (r - step) % n
            for i in range(chunks):
                for j in range(chunks):
                    mask = visible(ring, pos[r][i], seg[r][i], pos[src][j], seg[src][j])
                    counts[r] += bool(mask.any())
    return counts


# --- sharding -------------------------------------------------------------------------------


def _resolve_mesh(mesh, axis_name: str):
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or axis_name not in mesh.axis_names:
        raise ValueError(f"context parallelism needs a mesh with a {axis_name!r} axis; got "
                         f"axes {mesh.axis_names}: pass mesh= or call under jax.set_mesh")
    return mesh


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The mesh, and the specs of [B, S, H, D] activations, [B, S] positions and segment ids,
    and the [B, K, G, S] log-sum-exp."""

    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
    heads: P
    tokens: P
    lse: P

    @property
    def inputs(self) -> tuple[P, ...]:
        """Specs of (q, k, v, positions, segment_ids)."""
        return (self.heads,) * 3 + (self.tokens,) * 2

    def map(self, local, in_specs, out_specs):
        return jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)


def _layout(mesh, axis_name: str, q_shape: tuple[int, ...], kv_heads: int) -> _Layout:
    """Sequence over `axis_name`; batch and heads as `batch_and_head_axes` splits them."""
    batch, head_axis = batch_and_head_axes(mesh, batch=q_shape[0], heads=q_shape[2],
                                           kv_heads=kv_heads)
    return _Layout(mesh=mesh, heads=P(batch, axis_name, head_axis, None),
                   tokens=P(batch, axis_name), lse=P(batch, head_axis, None, axis_name))


def _check_shapes(q, k, v, positions, segment_ids, parts: int) -> None:
    batch, length, heads, dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, length) or k.shape[3] != dim:
        raise ValueError(f"k and v must be [B, S, K, D] = [{batch}, {length}, K, {dim}] to "
                         f"match q {q.shape}; got k {k.shape}, v {v.shape}")
    if heads % k.shape[2]:
        raise ValueError(f"kv heads {k.shape[2]} must divide query heads {heads}")
    for name, x in (("positions", positions), ("segment_ids", segment_ids)):
        if x.shape != (batch, length):
            raise ValueError(f"{name} must be [B, S] = {(batch, length)}; got {x.shape}")
    if length % parts:
        raise ValueError(f"sequence length {length} must be a multiple of {parts} "
                         "(context shards x chunks)")


# --- the per-device ring ----------------------------------------------------------------------
# Inside shard_map. Grouped layouts: q, dq, dout [B, t, K, G, D]; scores [B, K, G, t, s];
# running max m, denominator l and log-sum-exp [B, K, G, t]; numerator acc [B, K, G, t, D].


def _pass(x, axis: str):
    """Sends `x` (a pytree) to the next device of the ring."""
    n = jax.lax.axis_size(axis)
    return jax.lax.ppermute(x, axis, perm=[(i, (i + 1) % n) for i in range(n)])


def _chunk(x, chunks: int) -> tuple:
    return tuple(jnp.split(x, chunks, axis=1))


def _kv_block(k, v, pos, seg, chunks: int):
    """The block that travels: per-chunk keys, values, positions and segment ids."""
    return tuple(_chunk(x, chunks) for x in (k, v, pos, seg))


def _scores(q, k, mask):
    """Scaled float32 scores, -inf where masked."""
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=_F32)
    return jnp.where(mask[:, None, None], s * q.shape[-1] ** -0.5, -jnp.inf)


def _merge(state, q, k, v, mask):
    """Online-softmax update of (m, l, acc) with one key chunk."""
    return online_softmax.merge(state, _scores(q, k, mask), v)


def _skip_if_empty(update, carry, mask, *operands):
    """`update(carry, *operands, mask)` unless the mask is all False."""
    return jax.lax.cond(mask.any(), update, lambda c, *_: c, carry, *operands, mask)


def _pair(ring: _Ring, update, splash_update, carry, mask, segments, *operands):
    """One chunk pair's `update(carry, *operands, mask)`, skipped when the mask is all False; with
    the splash block kernel, `ring_splash.switch` runs `splash_update` where splash applies."""
    if ring.splash:
        return ring_splash.switch(update, splash_update, carry, mask, segments, *operands,
                                  interpret=ring.interpret)
    return _skip_if_empty(update, carry, mask, *operands)


def _forward_step(ring: _Ring, states, q, q_pos, q_seg, block):
    """Merges one travelling K/V block into every query chunk's softmax state."""
    ks, vs, k_pos, k_seg = block
    new = []
    for state, qi, pi, si in zip(states, q, q_pos, q_seg):
        for kj, vj, pj, sj in zip(ks, vs, k_pos, k_seg):
            mask = visible(ring.mask, pi, si, pj, sj)
            state = _pair(ring, _merge, ring_splash.merge, state, mask, (si, sj), qi, kj, vj)
        new.append(state)
    return tuple(new)


def _finalize(states, q):
    """Per-chunk softmax states -> (out [B, T, H, D] in q's dtype, lse [B, K, G, T])."""
    state = tuple(jnp.concatenate(parts, axis=3) for parts in zip(*states))
    out, lse = online_softmax.finalize(state)
    return out.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype), lse


def _ring_forward(ring: _Ring, q, k, v, pos, seg):
    """(out, lse) of the local queries against the K/V of the whole ring (`_finalize`)."""
    # Under a layer scan's autodiff, JAX hoists work that depends only on loop-invariant
    # inputs out of the loop: here every step's masks, from the positions and segment ids,
    # stacked over all n steps, O(S^2/n) per device. Tying them to q keeps them in the loop.
    q, k, v, pos, seg = jax.lax.optimization_barrier((q, k, v, pos, seg))
    c = ring.chunks
    q_args = (_chunk(online_softmax.group_heads(q, k.shape[2]), c), _chunk(pos, c),
              _chunk(seg, c))

    def step(carry, _):
        states, block = carry
        return (_forward_step(ring, states, *q_args, block), _pass(block, ring.axis)), None

    states = tuple(online_softmax.initial_state(qi, qi.shape[-1]) for qi in q_args[0])
    carry = (states, _kv_block(k, v, pos, seg, c))
    (states, block), _ = jax.lax.scan(step, carry, length=jax.lax.axis_size(ring.axis) - 1)
    return _finalize(_forward_step(ring, states, *q_args, block), q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring_attention_vjp(ring: _Ring, layout: _Layout, q, k, v, pos, seg):
    return _vjp_forward(ring, layout, q, k, v, pos, seg)[0]


def _vjp_forward(ring: _Ring, layout: _Layout, q, k, v, pos, seg):
    forward = layout.map(functools.partial(_ring_forward, ring), layout.inputs,
                         (layout.heads, layout.lse))
    out, lse = forward(q, k, v, pos, seg)
    return out, (q, k, v, pos, seg, out, lse)


def _vjp_backward(ring: _Ring, layout: _Layout, residuals, dout):
    in_specs = (*layout.inputs, layout.heads, layout.lse, layout.heads)
    backward = layout.map(functools.partial(_ring_backward, ring), in_specs, (layout.heads,) * 3)
    return *backward(*residuals, dout), None, None


def _grad_update(grads, q, k, v, dout, lse, delta, mask):
    """Adds one (query chunk, key chunk) pair's share to (dq, dk, dv), from recomputed scores."""
    shares = online_softmax.block_grads(_scores(q, k, mask), lse, delta, q, k, v, dout,
                                        q.shape[-1] ** -0.5)
    return tuple(g + share for g, share in zip(grads, shares))


def _backward_step(ring: _Ring, dq, q_args, block, dkv):
    """Adds the travelling block's pairs to the local dq and to the block's own (dk, dv)."""
    ks, vs, k_pos, k_seg = block
    dks, dvs = list(dkv[0]), list(dkv[1])
    dq = list(dq)
    for i, (qi, pi, si, doi, lsei, deltai) in enumerate(zip(*q_args)):
        for j, (kj, vj, pj, sj) in enumerate(zip(ks, vs, k_pos, k_seg)):
            mask = visible(ring.mask, pi, si, pj, sj)
            dq[i], dks[j], dvs[j] = _pair(
                ring, _grad_update, ring_splash.grad_update, (dq[i], dks[j], dvs[j]), mask,
                (si, sj), qi, kj, vj, doi, lsei, deltai)
    return tuple(dq), (tuple(dks), tuple(dvs))


def _ring_backward(ring: _Ring, q, k, v, pos, seg, out, lse, dout):
    """Local (dq, dk, dv). dK/dV travel with their K/V; after n passes they are back on the
    owning device."""
    c, kh = ring.chunks, k.shape[2]
    qg, dog, og = (online_softmax.group_heads(x, kh) for x in (q, dout, out))
    delta = online_softmax.output_delta(dog, og)
    q_args = (_chunk(qg, c), _chunk(pos, c), _chunk(seg, c), _chunk(dog, c),
              tuple(jnp.split(lse, c, axis=3)), tuple(jnp.split(delta, c, axis=3)))
    zeros_kv = _chunk(jnp.zeros(k.shape, _F32), c)

    def step(carry, _):
        dq, block, dkv = carry
        dq, dkv = _backward_step(ring, dq, q_args, block, dkv)
        return (dq, *_pass((block, dkv), ring.axis)), None

    carry = (_chunk(jnp.zeros(qg.shape, _F32), c), _kv_block(k, v, pos, seg, c),
             (zeros_kv, zeros_kv))
    (dq, block, dkv), _ = jax.lax.scan(step, carry, length=jax.lax.axis_size(ring.axis) - 1)
    dq, dkv = _backward_step(ring, dq, q_args, block, dkv)
    dk, dv = (jnp.concatenate(parts, axis=1) for parts in _pass(dkv, ring.axis))
    dq = jnp.concatenate(dq, axis=1).reshape(q.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring_attention_vjp.defvjp(_vjp_forward, _vjp_backward)
