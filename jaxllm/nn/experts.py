"""Routed SwiGLU experts: sort token-choices by expert, one grouped matmul, unsort, combine.

Seven kernels (`KERNELS`) compute the grouped matmul (`docs/references.md`, "Dropless MoE via
grouped matmul"; `docs/benchmarks.md` has their measured speed):
- "ragged_dot": `jax.lax.ragged_dot` over the sorted rows (XLA:CPU and XLA:GPU compute it
  densely per group).
- "gmm": jax's Pallas TPU megablox grouped matmul over the sorted rows
  (`jaxllm.nn.gmm_experts`), per device inside `jax.shard_map` under a mesh; interpret mode
  off TPU.
- "block_sparse": each expert's rows padded to whole blocks of B rows, then one batched
  matmul of every block with its expert's kernels (MegaBlocks' layout with static shapes).
  Dropless at most E*B rows of padding, and every product is one large batched matmul.
- "triton_gmm": the same blocks through a Pallas Triton grouped matmul
  (`jaxllm.nn.triton_experts`) that reads each block's expert kernels in place, with only
  the routed products in the backward pass too; per device inside `jax.shard_map` under a
  mesh, interpret mode off GPU. Untimed until a GPU run measures it, so "auto" never picks
  it.
- "mosaic_gmm": jax's Pallas Mosaic GPU ragged-dot kernels for Hopper over the sorted rows
  (`jaxllm.nn.mosaic_experts`), forward and backward, with no padding; per device inside
  `jax.shard_map` under a mesh, interpret mode off GPU. Untimed until a GPU run measures it,
  so "auto" never picks it.
- "tiled": a loop over tiles of each expert's rows, one dense SwiGLU per tile, that
  gathers, weights and adds back its rows itself, with a hand-written VJP
  (`jaxllm.nn.tiled_experts`): no padding that no routing fills, no sorted copy of the
  tokens.
- "sorted_einsum": the sorted rows scattered into padded [E, C, D] blocks and a batched
  einsum. Dropless when C covers the largest group (C = T always does).
"auto" picks by `target_platform()`: gmm on TPU (the kernel built for it; chosen because it
lowers and compiles for TPU, not from a TPU measurement), block_sparse on GPU and tiled
elsewhere.

With an fp8 recipe the batched matmuls of block_sparse and sorted_einsum go through
`fp8.batched_matmul`, and "auto" picks block_sparse; the other kernels take no fp8.
"""

import functools

import jax
import jax.numpy as jnp

from jaxllm.nn import fp8 as fp8_lib
from jaxllm.nn import gmm_experts, mosaic_experts, router, triton_experts
from jaxllm.nn.platform import target_platform
from jaxllm.nn.tiled_experts import tile_sizes, tiled_moe


def _swiglu(gate_up: jax.Array) -> jax.Array:
    """[..., 2, F] gate and up projections -> [..., F]."""
    return jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]


def grouped_swiglu(matmul, x_sorted, group_sizes, wi, wo):
    """x_sorted [M, D] rows grouped by expert, group_sizes [E], wi [E, D, 2, F], wo [E, F, D]
    -> [M, D], each row through its own expert, with `matmul(x [M, K], w [E, K, N],
    group_sizes)` as the grouped matmul."""
    num_experts, embed, _, hidden = wi.shape
    gate_up = matmul(x_sorted, wi.reshape(num_experts, embed, 2 * hidden), group_sizes)
    return matmul(_swiglu(gate_up.reshape(-1, 2, hidden)), wo, group_sizes)


def ragged_swiglu(x_sorted, group_sizes, wi, wo):
    """`grouped_swiglu` through `jax.lax.ragged_dot`."""
    return grouped_swiglu(jax.lax.ragged_dot, x_sorted, group_sizes, wi, wo)


def mosaic_swiglu(x_sorted, group_sizes, wi, wo):
    """`grouped_swiglu` through the Mosaic GPU kernels (`mosaic_experts.grouped_matmul`)."""
    return grouped_swiglu(mosaic_experts.grouped_matmul, x_sorted, group_sizes, wi, wo)


def block_size(rows: int, num_experts: int) -> int:
    """Rows per block: a power of two up to 128, at most rows / E, so padding adds <= 1x."""
    return max(8, min(128, 1 << max(0, (rows // num_experts).bit_length() - 1)))


KERNELS = ("auto", "ragged_dot", "gmm", "triton_gmm", "mosaic_gmm", "block_sparse", "tiled",
           "sorted_einsum")
FP8_KERNELS = ("block_sparse", "sorted_einsum")
PALLAS_KERNELS = ("gmm", "triton_gmm", "mosaic_gmm")  # run per device under a mesh


def _batched(fp8: fp8_lib.Recipe | None):
    """x [G, M, K], w [G, K, N] -> [G, M, N], in fp8 with the recipe `fp8` if given."""
    if fp8 is None:
        return lambda x, w: jnp.einsum("gmk,gkn->gmn", x, w)
    return functools.partial(fp8_lib.batched_matmul, r=fp8)


def _batched_swiglu(x, wi, wo, fp8):
    """x [G, M, D] through the SwiGLU of wi [G, D, 2, F], wo [G, F, D] -> [G, M, D]."""
    groups, embed, _, hidden = wi.shape
    matmul = _batched(fp8)
    gate_up = matmul(x, wi.reshape(groups, embed, 2 * hidden))
    return matmul(_swiglu(gate_up.reshape(*x.shape[:2], 2, hidden)), wo)


def block_layout(x_sorted, sorted_experts, group_sizes, block: int):
    """x_sorted's rows in blocks of `block` rows that each belong to one expert (MegaBlocks'
    layout with static shapes).

    The static block count G = M // B + E covers every routing:
    sum_e ceil(g_e / B) < M / B + E. Blocks past the last expert's hold zeros.

    Returns:
      (padded [G*B, D], dest [M] each row's padded row, owner [G] each block's expert
      (the last expert's past its blocks), bounds [E + 1]: expert e's blocks are bounds[e] to
      bounds[e + 1]).
    """
    rows, embed = x_sorted.shape
    num_experts = group_sizes.shape[0]
    num_blocks = rows // block + num_experts
    blocks = (group_sizes + block - 1) // block
    block_ends = jnp.cumsum(blocks)
    group_starts = jnp.cumsum(group_sizes) - group_sizes
    rank = jnp.arange(rows) - group_starts[sorted_experts]
    dest = (block_ends - blocks)[sorted_experts] * block + rank
    padded = jnp.zeros((num_blocks * block, embed), x_sorted.dtype)
    padded = padded.at[dest].set(x_sorted, unique_indices=True)
    owner = jnp.searchsorted(block_ends, jnp.arange(num_blocks), side="right")
    owner = jnp.minimum(owner, num_experts - 1).astype(jnp.int32)
    bounds = jnp.concatenate([jnp.zeros(1, block_ends.dtype), block_ends]).astype(jnp.int32)
    return padded, dest, owner, bounds


def block_sparse_swiglu(x_sorted, sorted_experts, group_sizes, wi, wo, fp8=None):
    """Like `ragged_swiglu`, through blocks of B rows that each belong to one expert
    (`block_layout`): one batched matmul of every block with a copy of its expert's kernels."""
    rows, embed = x_sorted.shape
    block = block_size(rows, wi.shape[0])
    padded, dest, owner, _ = block_layout(x_sorted, sorted_experts, group_sizes, block)
    out = _batched_swiglu(padded.reshape(-1, block, embed), wi[owner], wo[owner], fp8)
    return out.reshape(-1, embed)[dest]


def triton_swiglu(x_sorted, sorted_experts, group_sizes, wi, wo):
    """Like `ragged_swiglu`, through blocks of B rows that each belong to one expert
    (`block_layout`), each multiplied by its expert's kernels in place by the Pallas Triton
    grouped matmul (`jaxllm.nn.triton_experts`)."""
    rows = x_sorted.shape[0]
    num_experts, embed, _, hidden = wi.shape
    block = max(triton_experts.MIN_TILE, block_size(rows, num_experts))
    padded, dest, owner, bounds = block_layout(x_sorted, sorted_experts, group_sizes, block)
    matmul = functools.partial(triton_experts.grouped_matmul, owner=owner, bounds=bounds)
    gate_up = matmul(padded, wi.reshape(num_experts, embed, 2 * hidden))
    return matmul(_swiglu(gate_up.reshape(-1, 2, hidden)), wo)[dest]


def padded_swiglu(x_sorted, sorted_experts, slots, wi, wo, capacity: int, fp8=None):
    """Like `ragged_swiglu`, through padded [E, C, D] blocks.

    sorted_experts [M] is each row's expert and slots [M] its place in that expert's group;
    rows with slot >= capacity are dropped (their output is zero).
    """
    num_experts = wi.shape[0]
    blocks = jnp.zeros((num_experts, capacity, x_sorted.shape[-1]), x_sorted.dtype)
    blocks = blocks.at[sorted_experts, slots].set(x_sorted, mode="drop")  # [E, C, D]
    out = _batched_swiglu(blocks, wi, wo, fp8)  # [E, C, D]
    rows = out[sorted_experts, jnp.minimum(slots, capacity - 1)]
    return rows * (slots < capacity)[:, None]


def resolve_kernel(kernel: str) -> str:
    """The kernel that "auto" stands for on `target_platform()`; any other name unchanged."""
    if kernel != "auto":
        return kernel
    return {"tpu": "gmm", "gpu": "block_sparse"}.get(target_platform(), "tiled")


def sort_by_expert(flat: jax.Array, num_experts: int) -> jax.Array:
    """The stable order that sorts the expert ids `flat` [N]: one plain sort of int32 keys
    expert * N + index where they fit (no stable key-value sort needed), else an argsort."""
    n = flat.shape[0]
    if num_experts * n < 2**31:
        return jnp.sort(flat * n + jnp.arange(n, dtype=flat.dtype)) % n
    return jnp.argsort(flat, stable=True)


def routed_experts(x, weights, experts, wi, wo, *, capacity: int, kernel: str,
                   fp8: fp8_lib.Recipe | None = None):
    """Sum over each token's chosen experts of weight * SwiGLU_expert(x).

    Args:
      x: [T, D] tokens.
      weights, experts: [T, K] combine weights and expert ids.
      wi, wo: [E, D, 2, F] and [E, F, D] expert kernels, in the compute dtype.
      capacity: slots per expert; choices past it are dropped. T drops nothing.
      kernel: one of `KERNELS`.
      fp8: the fp8 recipe of the expert matmuls (block_sparse and sorted_einsum only).

    Returns:
      ([T, D] output, the fraction of token-choices dropped).
    """
    tokens, k = experts.shape
    num_experts = wi.shape[0]
    if kernel not in KERNELS:
        raise ValueError(f"unknown experts kernel {kernel!r}; choose one of {KERNELS}")
    kernel = "block_sparse" if fp8 is not None and kernel == "auto" else resolve_kernel(kernel)
    if fp8 is not None and kernel not in FP8_KERNELS:
        raise ValueError(f"the {kernel} experts kernel takes no fp8; use one of {FP8_KERNELS}")
    mesh = gmm_experts.token_mesh() if kernel in PALLAS_KERNELS else None
    if mesh is not None:  # a Pallas call runs per device
        routed = functools.partial(routed_experts, kernel=kernel)
        return gmm_experts.per_device(
            routed, x, weights, experts, wi, wo, mesh=mesh, capacity=capacity
        )
    # Choice-major order: every token's first choice takes a slot before any second choice,
    # so capacity drops the lower-ranked choices first (GShard).
    flat = experts.T.reshape(-1)  # [K*T], index k*T + t
    order = sort_by_expert(flat, num_experts)
    sorted_experts = flat[order]
    group_sizes = router.expert_counts(experts, num_experts).astype(jnp.int32)
    starts = jnp.cumsum(group_sizes) - group_sizes
    slots = jnp.arange(k * tokens) - starts[sorted_experts]  # place within the expert's group
    kept = slots < capacity
    dropped = jnp.mean(~kept, dtype=jnp.float32)
    if kernel == "tiled":  # gathers and combines the rows itself
        row_weights = weights.T.reshape(-1).astype(x.dtype)[order] * kept
        tiles = tile_sizes(k * tokens, num_experts)
        return tiled_moe(x, order % tokens, row_weights, group_sizes, wi, wo, *tiles), dropped
    x_sorted = x[order % tokens]  # [K*T, D]
    if kernel == "ragged_dot":
        out = ragged_swiglu(x_sorted, group_sizes, wi, wo) * kept[:, None]
    elif kernel == "gmm":
        out = gmm_experts.gmm_swiglu(x_sorted, group_sizes, wi, wo) * kept[:, None]
    elif kernel == "mosaic_gmm":
        out = mosaic_swiglu(x_sorted, group_sizes, wi, wo) * kept[:, None]
    elif kernel == "triton_gmm":
        out = triton_swiglu(x_sorted, sorted_experts, group_sizes, wi, wo) * kept[:, None]
    elif kernel == "block_sparse":
        out = block_sparse_swiglu(x_sorted, sorted_experts, group_sizes, wi, wo, fp8)
        out = out * kept[:, None]
    else:
        out = padded_swiglu(x_sorted, sorted_experts, slots, wi, wo, capacity, fp8)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(k * tokens), unique_indices=True)
    out = out[inverse].reshape(k, tokens, -1)  # unsort: [K, T, D]
    y = jnp.einsum("ktd,tk->td", out, weights.astype(out.dtype))
    return y, dropped
