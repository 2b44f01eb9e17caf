"""Ring attention's chunk pairs through splash attention, jax's Pallas TPU flash-attention kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`); `ring.ring_attention(block_kernel=...)`.

- Masks: splash's masks are static (by index), the ring's come from true positions and segment
  ids. Each chunk pair's mask is compared with the static candidates of `KINDS` (every key,
  causal, strictly causal: zigzag and plain orders give the first two, striped also the third)
  and the segment ids: a pair equal to one runs splash with that mask and the segment ids as
  its SegmentIds, an all-False pair is skipped, any other (e.g. under a sliding window) runs
  the ring's pure-JAX update. The classification is exact, so every order is correct.
- Forward: splash with its residual log-sum-exp (`save_residuals`), merged into the ring's
  running softmax state by log-sum-exp. Rows with no visible key in the pair count for nothing.
- Backward: splash's dq and dk/dv kernels, given the ring's global log-sum-exp and
  rowsum(dO * O), so each pair adds its exact share of the gradients. They are private
  functions of the kernel module (`_splash_attention_bwd_dq`, `_splash_attention_bwd_dkv`).
  Each pair's gradients come back in the inputs' dtype before the ring sums them in float32.
- Heads: the kernel's multi-head form, query head h reading kv head h // (H / K), vmapped over
  the batch. Scale: q is scaled before the call (the kernel does not scale scores).
- Length: chunks must be a multiple of 128 tokens (the kernel's lanes); blocks are the largest
  of 512, 256, 128 dividing the chunk.
- Platform: the caller picks interpret mode (Pallas interpret mode: slow, same numerics) off TPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from jaxllm.nn import online_softmax

LANES = 128  # the kernel's block sizes are multiples of this
BLOCKS = (512, 256, 128)
# Static masks by name: key index <= query index + offset, or every key (None).
_OFFSETS = {"full": None, "causal": 0, "strict": -1}
KINDS = tuple(_OFFSETS)
_F32 = jnp.float32


def unsupported(chunk: int, *, custom_vjp: bool) -> str | None:
    """Why the splash block kernel cannot run chunks of `chunk` tokens, else None."""
    if chunk % LANES:
        return (f"the splash block kernel needs chunks (sequence / (context shards x chunks)) "
                f"of a multiple of {LANES} tokens; got {chunk}")
    if not custom_vjp:
        return "the splash block kernel needs custom_vjp=True: its forward has no autodiff"
    return None


def switch(update, splash_update, carry, mask, segments, *operands, interpret: bool):
    """One chunk pair: skipped when its [B, t, s] mask is all False; `splash_update(kind, carry,
    *operands, mask, *segments)` when the mask is KINDS[kind]'s within segments; else
    `update(carry, *operands, mask)`."""
    segments = tuple(s.astype(jnp.int32) for s in segments)
    splash = [functools.partial(splash_update, kind, interpret=interpret) for kind in KINDS]
    branches = [lambda c, *_: c, *splash, lambda c, *args: update(c, *args[:-2])]
    return jax.lax.switch(classify(mask, *segments), branches, carry, *operands, mask, *segments)


def classify(mask, q_seg, k_seg):
    """A chunk pair's branch of `switch`, from its [B, t, s] mask and [B, t], [B, s] segment ids:
    0 (empty), 1 + i (KINDS[i]) or len(KINDS) + 1 (other)."""
    same = q_seg[:, :, None] == k_seg[:, None, :]
    matches = [~mask.any()]
    matches += [jnp.array_equal(mask, same & _static(kind, mask.shape[1:])) for kind in KINDS]
    return jnp.argmax(jnp.stack([*matches, jnp.array(True)]))


def _static(kind: str, shape: tuple[int, int]):
    """[t, s] mask of the static kind."""
    offset = _OFFSETS[kind]
    if offset is None:
        return jnp.ones(shape, bool)
    rows, cols = (jax.lax.broadcasted_iota(jnp.int32, shape, d) for d in (0, 1))
    return rows + offset >= cols


def merge(kind: str, state, q, k, v, mask, q_seg, k_seg, *, interpret: bool):
    """Online-softmax update of (m, l, acc) with one key chunk, attended by splash.

    q [B, t, K, G, D]; k, v [B, s, K, D]; mask [B, t, s]; q_seg [B, t], k_seg [B, s].
    """
    out, lse = _forward(kind, q, k, v, q_seg, k_seg, interpret=interpret)
    seen = mask.any(-1)[:, None, None]  # [B, 1, 1, t]: rows with a visible key
    return online_softmax.merge_attended(state, jnp.where(seen[..., None], out, 0.0),
                                         jnp.where(seen, lse, -jnp.inf))


def grad_update(kind: str, grads, q, k, v, dout, lse, delta, mask, q_seg, k_seg, *,
                interpret: bool):
    """Adds one chunk pair's share to float32 (dq, dk, dv), from splash's backward kernels
    given the global log-sum-exp and delta = rowsum(dO * O), both [B, K, G, t]."""
    del mask  # splash masks by its static mask and the segment ids
    b, t, kv_heads, group, d = q.shape
    kernel = _kernel(kind, t, k.shape[1], kv_heads * group, interpret)
    lse, delta = (x.reshape(b, kv_heads * group, t) for x in (lse, delta))
    dq, dk, dv = jax.vmap(functools.partial(_backward, kernel))(
        _heads(_scaled(q)), _kv_heads(k), _kv_heads(v), q_seg, k_seg, lse, _heads(dout), delta)
    dq = dq.astype(_F32).transpose(0, 2, 1, 3).reshape(q.shape) * d ** -0.5
    dk, dv = (x.astype(_F32).transpose(0, 2, 1, 3) for x in (dk, dv))
    return grads[0] + dq, grads[1] + dk, grads[2] + dv


def _forward(kind: str, q, k, v, q_seg, k_seg, *, interpret: bool):
    """Splash on one chunk pair -> (out [B, K, G, t, D] float32, lse [B, K, G, t])."""
    b, t, kv_heads, group, d = q.shape
    kernel = _kernel(kind, t, k.shape[1], kv_heads * group, interpret)

    def row(q, k, v, q_seg, k_seg):
        return kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(q=q_seg, kv=k_seg))

    out, (lse,) = jax.vmap(row)(_heads(_scaled(q)), _kv_heads(k), _kv_heads(v), q_seg, k_seg)
    return (out.astype(_F32).reshape(b, kv_heads, group, t, d),
            lse.reshape(b, kv_heads, group, t))


def _backward(kernel, q, k, v, q_seg, k_seg, lse, do, di):
    """Splash's dq and dk/dv kernels on one row: q, do [H, t, D]; k, v [K, s, D]; lse, di
    [H, t]."""
    options, sizes = kernel.kwargs, kernel.kwargs["block_sizes"]
    common = dict(
        segment_ids=kernel_lib.SegmentIds(q=q_seg, kv=k_seg), sinks=None, logsumexp=lse, do=do,
        di=di, is_mqa=False, mask_value=options["mask_value"], attn_logits_soft_cap=None,
        q_layout=sizes.q_layout, k_layout=sizes.k_layout, v_layout=sizes.v_layout,
        mask_function=options["mask_function"], interpret=options["interpret"])
    _, dk, dv = kernel_lib._splash_attention_bwd_dkv(
        q, k, v, bq=sizes.block_q_dkv, bkv=sizes.block_kv_dkv,
        bkv_compute=sizes.block_kv_dkv_compute, mask_info=kernel.dkv_mask_info,
        use_fused_bwd_kernel=False, **common)
    dq = kernel_lib._splash_attention_bwd_dq(
        q, k, v, bq=sizes.block_q_dq, bkv=sizes.block_kv_dq, mask_info=kernel.dq_mask_info,
        **common)
    return dq, dk, dv


def _kernel(kind: str, q_len: int, kv_len: int, heads: int, interpret: bool):
    """Splash with residuals for `heads` query heads under the static mask `kind`."""
    shape = (q_len, kv_len)
    offset = _OFFSETS[kind]
    one = (mask_lib.FullMask(shape) if offset is None
           else mask_lib.CausalMask(shape, offset=offset))
    block = next(b for b in BLOCKS if q_len % b == kv_len % b == 0)
    sizes = kernel_lib.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return kernel_lib.make_splash_mha_single_device(
        mask_lib.MultiHeadMask([one] * heads), block_sizes=sizes, save_residuals=True,
        interpret=interpret)


def _scaled(q):
    """q [B, t, K, G, D] times D ** -0.5, in float32, back in q's dtype."""
    return (q.astype(_F32) * q.shape[-1] ** -0.5).astype(q.dtype)


def _heads(x):
    """Grouped [B, t, K, G, D] -> [B, K * G, t, D]."""
    b, t, kv_heads, group, d = x.shape
    return x.reshape(b, t, kv_heads * group, d).transpose(0, 2, 1, 3)


def _kv_heads(x):
    """[B, s, K, D] -> [B, K, s, D]."""
    return x.transpose(0, 2, 1, 3)
