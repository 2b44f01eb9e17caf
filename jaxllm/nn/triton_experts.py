"""A grouped matmul in Pallas Triton over MegaBlocks' block layout (`kernel="triton_gmm"`).

The rows come in blocks of B rows that each belong to one expert, in expert order
(`experts.block_layout`): `owner` names each block's expert and `bounds` each expert's run
of blocks; blocks past the last expert's hold no rows.
- Forward: a grid over (block, column tile). Each program reads its block's expert from
  `owner` and multiplies the block's rows by that expert's kernel, read in place a tile at a
  time (no copy of a kernel per block), accumulating in float32. A block that holds no rows
  skips the product and writes zeros.
- Gradients (custom VJP): dx is the same kernel against the kernels read transposed; dW a
  grid over (expert, row tile, column tile) of the kernels, each program summing x^T dy over
  its own expert's blocks only, so an expert with no rows gets zeros. Every product is a
  routed one, up to the padding of each expert's last block.
- Tiles: powers of two, at least `MIN_TILE` rows and columns (Triton's smallest matrix
  product) and untuned; loads and stores are masked where a tile overhangs its dimension, so
  any width works.
- Platform: off GPU (`target_platform()`) the kernels run in Pallas interpret mode, the same
  kernels traced into plain XLA ops, so CPU tests check their numerics. On GPU they lower to
  Triton for any CUDA GPU that Triton supports.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxllm.nn.platform import target_platform

MIN_TILE = 16
COLUMN_TILE = 128  # forward: output columns per program
WEIGHT_TILE = 64  # dW: rows and columns of a kernel gradient per program
PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=2)


def _tile(dim: int, most: int) -> int:
    """The power of two at or above `dim`, clamped to [MIN_TILE, most]."""
    return min(most, max(MIN_TILE, pl.next_power_of_2(dim)))


def _depth_tile(depth: int, dtype) -> int:
    """Contraction elements per step: at most 128 bytes of a row."""
    return _tile(depth, 128 // jnp.dtype(dtype).itemsize)


def _inside(ref, rows: pl.Slice, cols: pl.Slice):
    """Which elements of the tile [rows, cols] of `ref`'s last two dimensions lie inside."""
    num_rows, num_cols = ref.shape[-2:]
    return ((rows.start + jnp.arange(rows.size) < num_rows)[:, None]
            & (cols.start + jnp.arange(cols.size) < num_cols)[None, :])


def _load(ref, *index):
    """ref[*index], a 2-D tile (its last two indices slices), zero where it overhangs."""
    return plgpu.load(ref.at[index], mask=_inside(ref, *index[-2:]), other=0)


def _store(ref, value, *index):
    """ref[*index] = value, a 2-D tile as in `_load`, less where it overhangs."""
    plgpu.store(ref.at[index], value.astype(ref.dtype), mask=_inside(ref, *index[-2:]))


def _call(kernel, *, grid, out_shape, name: str):
    """`kernel` as a Pallas Triton call over `grid`, every operand whole in each program;
    interpreted off GPU."""
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, compiler_params=PARAMS,
                          interpret=target_platform() != "gpu", name=name)


def _forward_kernel(owner_ref, bounds_ref, x_ref, w_ref, out_ref, *, transpose_w: bool,
                    depth_tile: int, column_tile: int):
    """out[a block's rows, a column tile] = those rows of x @ w[the block's expert] (or its
    transpose), in steps of `depth_tile` of the contraction."""
    block, column = pl.program_id(0), pl.program_id(1)
    block_rows = x_ref.shape[0] // owner_ref.shape[0]
    rows, cols = pl.ds(block * block_rows, block_rows), pl.ds(column * column_tile, column_tile)
    expert = owner_ref[block]

    def step(k, acc):
        depth = pl.ds(k * depth_tile, depth_tile)
        x = _load(x_ref, rows, depth)
        if transpose_w:
            return acc + plgpu.dot(x, _load(w_ref, expert, cols, depth), trans_b=True)
        return acc + plgpu.dot(x, _load(w_ref, expert, depth, cols))

    used = block < bounds_ref[bounds_ref.shape[0] - 1]
    steps = jnp.where(used, pl.cdiv(x_ref.shape[1], depth_tile), 0)
    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_rows, column_tile), jnp.float32))
    _store(out_ref, acc, rows, cols)


def _forward(x, w, owner, bounds, *, transpose_w: bool):
    """x [G*B, K] in blocks by w [E, K, N] (or [E, N, K] read transposed) -> [G*B, N]."""
    width = w.shape[1] if transpose_w else w.shape[2]
    column_tile = _tile(width, COLUMN_TILE)
    kernel = functools.partial(_forward_kernel, transpose_w=transpose_w,
                               depth_tile=_depth_tile(x.shape[1], x.dtype),
                               column_tile=column_tile)
    out_shape = jax.ShapeDtypeStruct((x.shape[0], width), x.dtype)
    grid = (owner.shape[0], pl.cdiv(width, column_tile))
    return _call(kernel, grid=grid, out_shape=out_shape, name="gmm_forward")(owner, bounds, x, w)


def _weight_grad_kernel(bounds_ref, x_ref, dy_ref, dw_ref, *, block_rows: int, tile: int):
    """dw[expert, row tile, column tile] = the sum over the expert's blocks of x^T dy."""
    expert, row, column = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    depth, cols = pl.ds(row * tile, tile), pl.ds(column * tile, tile)

    def step(block, acc):
        rows = pl.ds(block * block_rows, block_rows)
        return acc + plgpu.dot(_load(x_ref, rows, depth), _load(dy_ref, rows, cols), trans_a=True)

    acc = jax.lax.fori_loop(bounds_ref[expert], bounds_ref[expert + 1], step,
                            jnp.zeros((tile, tile), jnp.float32))
    _store(dw_ref, acc, expert, depth, cols)


def _weight_grad(x, dy, owner, bounds, *, w_dtype):
    """x [G*B, K] and dy [G*B, N] in blocks -> [E, K, N], each expert's x^T dy."""
    (rows, depth), width = x.shape, dy.shape[1]
    tile = _tile(max(depth, width), WEIGHT_TILE)
    kernel = functools.partial(_weight_grad_kernel, block_rows=rows // owner.shape[0],
                               tile=tile)
    num_experts = bounds.shape[0] - 1
    out_shape = jax.ShapeDtypeStruct((num_experts, depth, width), w_dtype)
    grid = (num_experts, pl.cdiv(depth, tile), pl.cdiv(width, tile))
    return _call(kernel, grid=grid, out_shape=out_shape, name="gmm_weight_grad")(bounds, x, dy)


@jax.custom_vjp
def grouped_matmul(x, w, owner, bounds):
    """Each block of x's rows times its expert's kernel.

    Args:
      x: [G*B, K] rows in G blocks of B, each block one expert's (B a power of two, at
        least `MIN_TILE`).
      w: [E, K, N] kernels.
      owner: [G] int32, each block's expert, nondecreasing.
      bounds: [E + 1] int32, expert e's blocks are bounds[e] to bounds[e + 1]; blocks from
        bounds[E] on hold no rows and give zeros.

    Returns:
      [G*B, N] in x's dtype, accumulated in float32.
    """
    return _forward(x, w, owner, bounds, transpose_w=False)


def _grouped_matmul_fwd(x, w, owner, bounds):
    return grouped_matmul(x, w, owner, bounds), (x, w, owner, bounds)


def _grouped_matmul_bwd(residuals, dy):
    x, w, owner, bounds = residuals
    dx = _forward(dy, w, owner, bounds, transpose_w=True)
    return dx, _weight_grad(x, dy, owner, bounds, w_dtype=w.dtype), None, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)
