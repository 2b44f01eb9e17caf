"""A grouped matmul through jax's Pallas Mosaic GPU ragged-dot kernels for Hopper GPUs
(`kernel="mosaic_gmm"`).

The rows come sorted by expert, `group_sizes` rows per expert, as `jax.lax.ragged_dot` takes
them; no row is padded.
- Forward: `ragged_dot_mgpu.ragged_dot`, a persistent kernel over tiles of (rows, output
  columns). A row tile that straddles two experts runs once for each, storing only its own
  expert's rows, so only the routed products are computed, accumulated in float32 by wgmma.
- Gradients (custom VJP): dx is the same kernel against the transposed kernels (a copy of
  the weights, small beside the rows; the interpreter cannot read them transposed in
  place); dW is `transposed_ragged_dot_mgpu.transposed_ragged_dot`, each expert's
  x^T dy over its own rows (zeros for an expert with none).
- Tiles: `BLOCK` rows; columns and kernel rows in tiles of 128 or 64, whichever divides
  them; the contraction in steps of `DEPTH` elements. So the model and expert widths must be
  multiples of 64 (`MOSAIC_GMM_BLOCK`, which the config checks).
- Dtypes: bfloat16 or float16 on GPU (wgmma's inputs), x and the kernels alike.
- Platform: Hopper (compute capability 9.x). Off GPU (`target_platform()`) the forward and dx
  kernels run in Pallas's Mosaic GPU interpret mode, so CPU tests check their numerics; dW
  there is the transpose of `jax.lax.ragged_dot` in XLA, since the interpreter cannot run
  the dW kernel (and that kernel sizes its grid by the GPU's SM count).
- Sharding: per device, as the other Pallas kernels (`gmm_experts.per_device`). The
  interpreter runs one device at a time, so off GPU the kernel refuses a mesh of several.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

from jaxllm.config import MOSAIC_GMM_BLOCK
from jaxllm.nn.platform import target_platform

BLOCK = 128  # rows per tile
# Output columns (and dW's kernel rows) per tile, largest first.
COLUMN_BLOCKS = (2 * MOSAIC_GMM_BLOCK, MOSAIC_GMM_BLOCK)
DEPTH = MOSAIC_GMM_BLOCK  # contraction elements per pipeline step: 128 bytes of bfloat16
STEPS = 4  # pipeline stages in flight, forward and dx
WEIGHT_GRAD_STEPS = 2
DTYPES = (jnp.bfloat16, jnp.float16)


def _columns(width: int, what: str) -> int:
    """The largest of `COLUMN_BLOCKS` that divides `width`."""
    for block in COLUMN_BLOCKS:
        if width % block == 0:
            return block
    raise ValueError(f"mosaic_gmm tiles {what} in blocks of {COLUMN_BLOCKS[-1]}, so it must be "
                     f"a multiple of {COLUMN_BLOCKS[-1]}; got {width}")


def _interpreted(call):
    """`call()` in Mosaic GPU interpret mode. A tile that overhangs the rows reads them as
    TMA would, not as an error; the interpreter fills them with NaN, where TMA reads zeros,
    so a product of them that reached the output would show."""
    from jax._src.pallas.mosaic_gpu.interpret import params

    devices = jax.sharding.get_abstract_mesh().size
    if devices > 1:
        raise ValueError(f"mosaic_gmm off GPU runs in Mosaic GPU interpret mode, which takes "
                         f"one device at a time, not a mesh of {devices}; use another "
                         "kernel there")
    with params.force_gpu_interpret_mode(
            params.InterpretGPUParams(out_of_bounds_reads="uninitialized")):
        return call()


def _ragged_dot(lhs, rhs, group_sizes):
    """lhs [M, K] rows grouped by `group_sizes` [G], rhs [G, K, N] -> [M, N], each row
    group by its own rhs."""
    _columns(lhs.shape[1], "the contraction")
    call = functools.partial(
        ragged_dot_mgpu.ragged_dot, lhs, rhs, group_sizes=group_sizes, block_m=BLOCK,
        block_n=_columns(rhs.shape[2], "the output width"), block_k=DEPTH,
        max_concurrent_steps=STEPS, grid_block_n=1)
    return call() if target_platform() == "gpu" else _interpreted(call)


def _weight_grad(x, dy, group_sizes):
    """x [M, K], dy [M, N] rows grouped by `group_sizes` [G] -> [G, K, N]: x_g^T dy_g."""
    if target_platform() == "gpu":
        return transposed_ragged_dot_mgpu.transposed_ragged_dot(
            x, dy, group_sizes=group_sizes, block_m=_columns(x.shape[1], "the input width"),
            block_n=_columns(dy.shape[1], "the output width"), block_k=DEPTH,
            max_concurrent_steps=WEIGHT_GRAD_STEPS, grid_block_n=1)
    shape = (group_sizes.shape[0], x.shape[1], dy.shape[1])
    _, transpose = jax.vjp(lambda w: jax.lax.ragged_dot(x, w, group_sizes),
                           jnp.zeros(shape, x.dtype))
    return transpose(dy)[0]


def check_device(dtype) -> None:
    """Raises where the target is a TPU, or a GPU and `dtype` not one wgmma takes, or where
    the local GPU is not a Hopper."""
    if target_platform() == "tpu":
        raise ValueError("mosaic_gmm is a GPU kernel; on TPU use gmm (or auto)")
    if target_platform() == "gpu" and dtype not in DTYPES:
        raise ValueError(f"mosaic_gmm takes bfloat16 or float16 activations, not {dtype}")
    if jax.default_backend() == "gpu":
        device = jax.devices()[0]
        if not str(device.compute_capability).startswith("9"):
            raise ValueError(f"mosaic_gmm runs on Hopper GPUs (compute capability 9.x), not "
                             f"{device.device_kind} ({device.compute_capability})")


def grouped_matmul(x, w, group_sizes):
    """x [M, K] rows grouped by `group_sizes` [G] (summing to M), w [G, K, N] -> [M, N] in
    x's dtype, each group of rows by its own kernel; refuses a device or dtype the kernels
    cannot run (`check_device`)."""
    check_device(x.dtype)
    return _grouped_matmul(x, w, group_sizes.astype(jnp.int32))


@jax.custom_vjp
def _grouped_matmul(x, w, group_sizes):
    return _ragged_dot(x, w, group_sizes)


def _grouped_matmul_forward(x, w, group_sizes):
    return _ragged_dot(x, w, group_sizes), (x, w, group_sizes)


def _grouped_matmul_backward(residuals, dy):
    x, w, group_sizes = residuals
    dy = dy.astype(x.dtype)
    return (_ragged_dot(dy, jnp.swapaxes(w, 1, 2), group_sizes),
            _weight_grad(x, dy, group_sizes).astype(w.dtype), None)


_grouped_matmul.defvjp(_grouped_matmul_forward, _grouped_matmul_backward)
