"""GPU flash-attention kernels for self-attention over whole rows, each equal to the naive
kernel for the layers it takes and refusing the others.

cudnn: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused attention.
- Masks: global (`is_causal`) and sliding (`local_window_size=(window - 1, 0)`: keys
  i-window+1..i, which jax hands cuDNN as its sliding window of `window` keys). No chunked or
  strided masks, no ALiBi: the call has no form for them short of a full score bias.
- Packed documents: the call takes no segment ids (its sequence lengths mark padding only),
  so the segment ids go in as its boolean mask, [B, 1, S, S] for all heads, which jax hands
  cuDNN as an additive bias: exact, at the cost of S² bias elements per row however many
  documents a row holds (and, before jax 0.11, a bias gradient that cuDNN computes and jax
  drops).
- Heads: K kv heads for H query heads as they are (GQA, MQA); v as wide as q and k.
- Dtypes: bfloat16 or float16 on GPU, as cuDNN requires.
- Platform: off GPU (`target_platform()`) the same call runs jax's XLA implementation, so
  models and tests run on CPU.

pallas_gpu: jax's Pallas GPU (Triton) flash attention, `jax.experimental.pallas.ops.gpu.
attention.mha`, with its own custom VJP. jax 0.11 deprecates the module (and Pallas's Triton
backend) in favour of tokamax; it still ships and runs.
- Masks: global only (the kernel's `causal`); packed documents as its segment ids. The kernel
  has no window, so sliding and other masks are refused.
- Heads: the kernel wants as many kv heads as query heads, so each kv head is repeated H / K
  times; the gradient sums over the copies.
- Widths: v as wide as q and k.
- Blocks: tiles of a power of two tokens, at least 16 (Triton's smallest matrix product): the
  largest of at most 128 (forward) and 32 (backward, jax's defaults) that divide S, so S must
  be a multiple of 16.
- Platform: off GPU the kernel runs in Pallas interpret mode: slow, with the same numerics.
- Sharding: inside `jax.shard_map` under a mesh (`per_device`), as splash.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as mha_lib

from jaxllm.config import ROW_KERNEL_LAYERS
from jaxllm.nn.masks import Mask
from jaxllm.nn.mesh_axes import per_device
from jaxllm.nn.platform import target_platform

CUDNN_MASKS = ROW_KERNEL_LAYERS["cudnn"]
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
PALLAS_GPU_MASKS = ROW_KERNEL_LAYERS["pallas_gpu"]
MIN_BLOCK = 16
FORWARD_BLOCK, BACKWARD_BLOCK = 128, 32


def cudnn_attention(q, k, v, segment_ids, *, mask: Mask = Mask(), scale: float | None = None):
    """Self-attention of a row of S tokens at indices 0..S-1 through cuDNN; equals the naive
    kernel.

    Args:
      q: [B, S, H, D] queries; k, v: [B, S, K, D] keys and values; K divides H.
      segment_ids: [B, S] packed-document ids; attention never crosses them.
      mask: a global or sliding mask.
      scale: the softmax scale; default D ** -0.5.

    Returns:
      [B, S, H, D] in q's dtype.
    """
    implementation = "cudnn" if target_platform() == "gpu" else "xla"
    _check_mask("cudnn", mask, CUDNN_MASKS)
    if implementation == "cudnn" and q.dtype not in CUDNN_DTYPES:
        raise ValueError(f"cudnn attention takes bfloat16 or float16 q, k and v, not {q.dtype}")
    window = (mask.window - 1, 0) if mask.kind == "sliding" else None
    same_document = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=same_document, scale=scale,
                                        is_causal=True, local_window_size=window,
                                        implementation=implementation)


def pallas_gpu_attention(q, k, v, segment_ids, *, mask: Mask = Mask(),
                         scale: float | None = None):
    """Self-attention of a row of S tokens at indices 0..S-1 through jax's Pallas GPU flash
    kernel; equals the naive kernel. Arguments and result as `cudnn_attention`, with a
    global mask only and S a multiple of 16."""
    _check_mask("pallas_gpu", mask, PALLAS_GPU_MASKS)
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"kv heads {kv_heads} must divide query heads {heads}")
    blocks = block_sizes(q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    interpret = target_platform() != "gpu"

    def run(q, k, v, segment_ids):
        k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
        return mha_lib.mha(q, k, v, segment_ids, sm_scale=scale, causal=True,
                           block_sizes=blocks, interpret=interpret)

    run = per_device(run, q_shape=q.shape, kv_heads=kv_heads)
    return run(q, k, v, segment_ids.astype(jnp.int32))


def block_sizes(length: int) -> mha_lib.BlockSizes:
    """The Pallas GPU kernel's tiles for rows of `length` tokens: forward and backward, each
    the largest power of two up to FORWARD_BLOCK or BACKWARD_BLOCK that divides `length`."""
    if length % MIN_BLOCK:
        raise ValueError(f"pallas_gpu attention tiles a row in blocks of at least {MIN_BLOCK} "
                         f"tokens, so its length must be a multiple of {MIN_BLOCK}; got {length}")
    forward, backward = (_largest_divisor(length, block)
                         for block in (FORWARD_BLOCK, BACKWARD_BLOCK))
    return mha_lib.BlockSizes(block_q=forward, block_k=forward, block_q_dkv=backward,
                              block_kv_dkv=backward, block_q_dq=backward, block_kv_dq=backward)


def _largest_divisor(length: int, block: int) -> int:
    """The largest power-of-two fraction of `block` that divides `length`."""
    while length % block:
        block //= 2
    return block


def _check_mask(kernel: str, mask: Mask, masks: tuple[str, ...]) -> None:
    if mask.kind not in masks:
        raise ValueError(f"{kernel} attention runs masks {masks}, not {mask.kind!r}")
