"""Which attention kernel runs a layer, and the calls into each: naive (`naive.py`), blockwise
(`blockwise.py`), splash (`splash.py`), cudnn and pallas_gpu (`gpu_attention.py`), backend
(`jax.nn.dot_product_attention`), and the context-parallel ring or all-gather (`ring.py`)
when the mesh splits sequences."""

import jax

from jaxllm.nn.blockwise import blockwise_attention
from jaxllm.nn.gpu_attention import cudnn_attention, pallas_gpu_attention
from jaxllm.nn.masks import Mask, alibi_bias, row_indices, visible
from jaxllm.nn.mesh_axes import context_shards
from jaxllm.nn.naive import dot_product_attention
from jaxllm.nn.platform import target_platform
from jaxllm.nn.ring import all_gather_attention, ring_attention
from jaxllm.nn.splash import MASKS as SPLASH_MASKS
from jaxllm.nn.splash import splash_attention

# How attention runs when the mesh splits sequences over `context` (ModelConfig field).
CONTEXT_PARALLEL = {"ring": ring_attention, "all_gather": all_gather_attention}
KERNELS = ("naive", "blockwise", "splash", "cudnn", "pallas_gpu", "backend", "auto")
# Self-attention over whole rows, from the segment ids alone; none of them runs ALiBi.
ROW_KERNELS = {"splash": splash_attention, "cudnn": cudnn_attention,
               "pallas_gpu": pallas_gpu_attention}
# The kernels that take v only as wide as k (MLA pads v for them).
EQUAL_WIDTH_KERNELS = ("cudnn", "pallas_gpu", "backend")
BLOCKWISE_MASKS = ("global", "sliding", "chunked", "strided")


def resolve_kernel(kernel: str, mask: Mask, *, alibi: bool = False,
                   platform: str | None = None) -> str:
    """The kernel "auto" stands for in a layer with `mask` (and ALiBi positions if `alibi`)
    on `platform` (default `target_platform()`): on TPU splash, the Pallas kernel built for
    it, where it runs the layer, else blockwise where that does, else naive; naive on other
    platforms. The TPU choice follows from what compiles for TPU, not from a measurement.
    Any other name unchanged."""
    if kernel != "auto":
        return kernel
    if (platform or target_platform()) != "tpu":
        return "naive"
    if mask.kind in SPLASH_MASKS and not alibi:
        return "splash"
    return "blockwise" if mask.kind in BLOCKWISE_MASKS else "naive"


def attend(q, k, v, q_idx, q_seg, k_idx, k_seg, *, mask: Mask = Mask(), slopes=None,
           scale: float | None = None, kernel: str = "naive", block_size: int = 128):
    """Attention of queries at row indices `q_idx` [B, T] to keys at `k_idx` [B, S], within
    matching segment ids, under `mask`, with ALiBi `slopes` [H] if given.

    kernel: "naive" materialises the [B, H, T, S] scores; "blockwise" is the flash-style
    kernel for self-attention over a whole row (`blockwise.py`), "splash" the Pallas TPU
    one (`splash.py`: global, sliding and chunked masks), "cudnn" cuDNN's (global and
    sliding masks) and "pallas_gpu" the Pallas GPU one (global masks; both `gpu_attention.py`),
    none of the three with ALiBi or `block_size`; "backend" calls
    `jax.nn.dot_product_attention` with its default (XLA) implementation; "auto" picks one
    of them (`resolve_kernel`).
    """
    kernel = resolve_kernel(kernel, mask, alibi=slopes is not None)
    if kernel in ROW_KERNELS:
        if slopes is not None:
            raise ValueError(f"{kernel} attention does not run ALiBi; use kernel blockwise")
        return ROW_KERNELS[kernel](q, k, v, q_seg, mask=mask, scale=scale)
    if kernel == "blockwise":
        return blockwise_attention(q, k, v, q_seg, mask=mask, slopes=slopes, scale=scale,
                                   block_size=block_size)
    allowed = visible(mask, q_idx, q_seg, k_idx, k_seg)
    bias = None if slopes is None else alibi_bias(slopes, q_idx, k_idx)
    if kernel == "backend":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=allowed[:, None],
                                            scale=scale)
    if kernel != "naive":
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS}")
    return dot_product_attention(q, k, v, allowed, bias=bias, scale=scale)


def self_attention(q, k, v, positions, segment_ids, *, mask: Mask, slopes=None,
                   scale: float | None = None, kernel: str = "naive", block_size: int = 128,
                   context_parallel: str = "ring"):
    """Attention within a row of packed documents [B, S]: over the mesh's `context` axis
    when it splits sequences, else with `kernel` (see `attend`)."""
    if context_shards() > 1:
        if mask.kind not in ("global", "sliding") or slopes is not None:
            raise ValueError(f"context parallelism runs global or sliding layers with RoPE or "
                             f"NoPE; this one has mask {mask.kind!r}"
                             f"{' and ALiBi' if slopes is not None else ''}")
        if scale is not None:  # the ring kernels scale by D ** -0.5
            q = q * (scale * q.shape[-1] ** 0.5)
        window = mask.window if mask.kind == "sliding" else None
        return CONTEXT_PARALLEL[context_parallel](q, k, v, positions, segment_ids, window=window)
    idx = row_indices(segment_ids)
    return attend(q, k, v, q_idx=idx, q_seg=segment_ids, k_idx=idx, k_seg=segment_ids,
                  mask=mask, slopes=slopes, scale=scale, kernel=kernel, block_size=block_size)
