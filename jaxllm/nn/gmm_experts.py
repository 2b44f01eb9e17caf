"""The grouped SwiGLU through jax's Pallas TPU megablox grouped matmul (`kernel="gmm"`).

`megablox.gmm` multiplies each expert's rows of a matrix sorted by expert by that expert's
kernel, visiting only the row tiles a group touches.
- Gradients: `megablox.gmm` carries its own custom VJP: the input gradient is a gmm against
  the transposed kernels and the kernel gradient a `tgmm`, both with the forward's tiling.
- Tiling and padding: `tiling`. The rows are padded with zeros to a multiple of the row tile
  and the padding counted in the last expert, so that the kernel writes every row (none is
  left uninitialised) and the padded rows stay zero; their outputs are dropped.
- Platform: off TPU (`target_platform()`) the kernel runs in Pallas interpret mode, the same
  kernel traced into plain XLA ops, so CPU tests check its numerics.
- Sharding: GSPMD cannot partition a Pallas call. Inside expert parallelism's shard_map
  (`jaxllm.nn.expert_parallel`) it already runs per device; under any other mesh `per_device`
  runs the whole routed MoE in a `jax.shard_map` (for triton_gmm and mosaic_gmm too). A
  Pallas call does not type how its output varies over the mesh, so these shard_maps run
  with check_vma=False.
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import gmm
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxllm.nn.platform import target_platform
from jaxllm.parallel import BATCH_AXES, CONTEXT, EXPERT, TENSOR

# The flattened tokens [B*S] split over these axes, in the order of the activations' layout
# (batch over data and fsdp, positions over context), then expert.
ROW_AXES = (*BATCH_AXES, CONTEXT, EXPERT)


def tiling(rows: int, k: int, n: int, num_experts: int) -> tuple[int, int, int]:
    """(tm, tk, tn) of a gmm of [rows, k] rows in `num_experts` groups by [k, n] kernels.

    tm follows the mean group size, a power of two from 128 to 512, since each group computes
    whole row tiles; fewer rows make one tile of all of them (rounded up to 8). tk = tn: the
    VJP reuses the tiling with k and n swapped (the gmm against transposed kernels), so one
    tile serves both: the largest power of two from 128 to 1024 that divides both, else 128.
    A multiple of 128 is a legal TPU block of either dimension; the kernel masks a block that
    overhangs its dimension.
    """
    mean = max(1, rows // num_experts)
    tm = min(max(128, 1 << (mean.bit_length() - 1)), 512, -(-rows // 8) * 8)
    common = math.gcd(k, n)
    tile = min(max(128, common & -common), 1024)
    return tm, tile, tile


def gmm_swiglu(x_sorted, group_sizes, wi, wo):
    """x_sorted [M, D] rows grouped by expert, group_sizes [E] summing to M, wi [E, D, 2, F],
    wo [E, F, D] -> [M, D], each row through its own expert (`experts.ragged_swiglu`)."""
    rows, embed = x_sorted.shape
    num_experts, _, _, hidden = wi.shape
    interpret = target_platform() != "tpu"
    up_tiling = tiling(rows, embed, 2 * hidden, num_experts)
    padded = -(-rows // up_tiling[0]) * up_tiling[0]
    x = jnp.pad(x_sorted, ((0, padded - rows), (0, 0)))
    sizes = group_sizes.astype(jnp.int32).at[-1].add(padded - rows)
    gate_up = gmm(x, wi.reshape(num_experts, embed, 2 * hidden), sizes,
                  preferred_element_type=x.dtype, tiling=up_tiling, interpret=interpret)
    gate_up = gate_up.reshape(padded, 2, hidden)
    h = jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]
    out = gmm(h, wo, sizes, preferred_element_type=x.dtype,
              tiling=tiling(rows, hidden, embed, num_experts), interpret=interpret)
    return out[:rows]


def token_mesh() -> AbstractMesh | None:
    """The current mesh if `per_device` applies (a mesh, outside shard_map), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.manual_axes else mesh


def _row_axes(mesh: AbstractMesh, tokens: int) -> tuple[str, ...]:
    """The axes of `ROW_AXES` in `mesh`, in order, less any that would not divide `tokens`."""
    axes, shards = [], 1
    for axis in ROW_AXES:
        if axis in mesh.axis_names and tokens % (shards * mesh.shape[axis]) == 0:
            axes.append(axis)
            shards *= mesh.shape[axis]
    return tuple(axes)


def per_device(routed, x, weights, experts, wi, wo, *, mesh: AbstractMesh, capacity: int):
    """`routed(x, weights, experts, wi, wo, capacity=...)` (the routed MoE with a Pallas
    kernel: gmm, triton_gmm or mosaic_gmm) run on each device of `mesh` inside
    `jax.shard_map`.

    Each device routes, sorts and combines its own tokens, split over the data, fsdp, context
    and expert axes (those that divide them; tokens are repeated over the others), so no
    device holds another's rows. Each holds every expert, as any of its rows may choose any,
    but only its slice of the hidden dimension F over `tensor` (where that divides F, else
    all of F): the gate/up projections and SwiGLU of that slice are exact, and its down
    projections are partial sums, added over `tensor` by a psum of the combined [t, D]
    output (K times smaller than the rows). Capacity dispatch gives each token shard
    ceil(capacity / shards) slots per expert; dropless keeps all of its tokens.

    Returns:
      ([T, D] output, the fraction of token-choices dropped).
    """
    row_axes = _row_axes(mesh, x.shape[0])
    rows = P(row_axes)
    tensor = mesh.shape.get(TENSOR, 1)
    hidden_axis = TENSOR if tensor > 1 and wi.shape[-1] % tensor == 0 else None
    local_capacity = -(-capacity // math.prod(mesh.shape[a] for a in row_axes))

    def local(x, weights, experts, wi, wo):
        y, dropped = routed(x, weights, experts, wi, wo, capacity=local_capacity)
        if hidden_axis:
            y = jax.lax.psum(y, hidden_axis)
        return y, dropped[None]

    run = jax.shard_map(
        local, mesh=mesh,
        in_specs=(rows, rows, rows, P(None, None, None, hidden_axis), P(None, hidden_axis)),
        out_specs=(rows, rows), check_vma=False,  # Pallas calls do not type their variance
    )
    y, dropped = run(x, weights, experts, wi, wo)
    return y, jnp.mean(dropped)
