"""Splash attention: jax's Pallas TPU flash-attention kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`) for self-attention over whole rows.

- Masks: global, sliding and chunked causal masks, as the kernel's lazy CausalMask, LocalMask
  and ChunkedCausalMask, one per head; packed documents as its SegmentIds.
- Heads: the kernel's multi-head form takes K kv heads for H query heads (GQA, MQA) and maps
  query head h to kv head h // (H / K), as `dot_product_attention` groups them.
- Widths: the value head may be narrower or wider than the query/key head (MLA); the kernel
  takes them as they are. Head widths need not be multiples of 128 (the TPU kernel compiles
  with others), though multiples of 128 fill its vector lanes.
- Scale: the kernel does not scale scores, so q is scaled (in float32) before the call.
- Length: the kernel's blocks are multiples of 128 tokens, so rows are padded to a multiple
  of 128. The padding comes after every real token, which causal masks hide, and its outputs
  are dropped. Every block is the largest power-of-two fraction of `block_size` that divides
  the padded length.
- Platform: off TPU (`target_platform()`) the kernel runs in Pallas interpret mode: slow, with
  the same numerics, so models and tests run on CPU.
- Sharding: GSPMD cannot partition a Pallas call, so under a mesh the kernel runs inside
  `jax.shard_map`: batch over the data/fsdp axes and heads over `tensor` where they divide
  those dimensions, else replicated; the sequence is never split (a context-split mesh routes
  attention to the ring instead).
- Gradients: the kernel's own custom VJP (flash-style backward kernels for dq and dk/dv).
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from jaxllm.config import ROW_KERNEL_LAYERS
from jaxllm.nn.masks import Mask
from jaxllm.nn.mesh_axes import per_device
from jaxllm.nn.platform import target_platform

MASKS = ROW_KERNEL_LAYERS["splash"]
LANES = 128  # the kernel's block sizes are multiples of this


def splash_attention(q, k, v, segment_ids, *, mask: Mask = Mask(), scale: float | None = None,
                     block_size: int = 512):
    """Self-attention of a row of S tokens at indices 0..S-1; equals the naive kernel.

    Args:
      q: [B, S, H, D] queries; k: [B, S, K, D] keys; v: [B, S, K, Dv] values; K divides H.
      segment_ids: [B, S] packed-document ids; attention never crosses them.
      mask: a global, sliding or chunked mask.
      scale: the softmax scale; default D ** -0.5.
      block_size: the largest query and key block: 128 times a power of two.

    Returns:
      [B, S, H, Dv] in q's dtype.
    """
    _check(q, k, v, mask, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    length = q.shape[1]
    padded = -(-length // LANES) * LANES
    q, k, v, segment_ids = (
        jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
        for x in (q, k, v, segment_ids.astype(jnp.int32)))
    run = _local(mask=mask, block_size=block_size, interpret=target_platform() != "tpu")
    run = per_device(run, q_shape=q.shape, kv_heads=k.shape[2])
    return run(q, k, v, segment_ids)[:, :length]


def _check(q, k, v, mask: Mask, block_size: int) -> None:
    if mask.kind not in MASKS:
        raise ValueError(f"splash attention runs masks {MASKS}, not {mask.kind!r}")
    blocks = block_size // LANES
    if block_size % LANES or blocks & (blocks - 1):
        raise ValueError(f"splash block_size must be {LANES} times a power of two, "
                         f"got {block_size}")
    batch, length, heads, dim = q.shape
    if k.shape[:2] != (batch, length) or k.shape[-1] != dim or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k [B, S, K, D] and v [B, S, K, Dv] must match q {q.shape}; got "
                         f"k {k.shape}, v {v.shape}")
    if heads % k.shape[2]:
        raise ValueError(f"kv heads {k.shape[2]} must divide query heads {heads}")


def _local(*, mask: Mask, block_size: int, interpret: bool):
    """The kernel over [B, S, H, D] arrays of one device, vmapped over the batch."""

    def run(q, k, v, segment_ids):
        length, heads = q.shape[1], q.shape[2]
        kernel = kernel_lib.make_splash_mha_single_device(
            _multi_head_mask(mask, length, heads),
            block_sizes=_block_sizes(length, block_size), interpret=interpret)

        def row(q, k, v, ids):
            return kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(q=ids, kv=ids))

        heads_first = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        return jax.vmap(row)(*heads_first, segment_ids).transpose(0, 2, 1, 3)

    return run


def _multi_head_mask(mask: Mask, length: int, heads: int) -> mask_lib.MultiHeadMask:
    """The kernel's lazy form of `mask` over [length, length], the same for every head."""
    shape = (length, length)
    if mask.kind == "sliding":  # the `window` keys ending at the query
        one = mask_lib.LocalMask(shape, window_size=(mask.window - 1, 0), offset=0)
    elif mask.kind == "chunked":
        one = mask_lib.ChunkedCausalMask(shape, chunk_size=mask.chunk)
    else:
        one = mask_lib.CausalMask(shape)
    return mask_lib.MultiHeadMask([one] * heads)


def _block_sizes(length: int, block_size: int) -> kernel_lib.BlockSizes:
    """One block size for every forward and backward tile: the largest power-of-two
    fraction of `block_size` that divides `length` (a multiple of 128)."""
    block = block_size
    while length % block:
        block //= 2
    return kernel_lib.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
