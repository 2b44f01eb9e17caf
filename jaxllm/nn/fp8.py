"""FP8 matmuls: quantise, dequantise, and a matmul whose three GEMMs (forward, input
gradient, weight gradient) all take fp8 operands and accumulate in float32.

Two recipes (`docs/fp8.md`):
- "tensorwise" (Transformer Engine's delayed scaling): one scale per operand, from the
  largest amax over a history of recent steps; e4m3 forward, e5m2 gradients.
- "blockwise" (DeepSeek-V3, arXiv 2412.19437 §3.3): one scale per 1 x B tile of activations
  and gradients along the contracted axis, per B x B block of weights; e4m3 throughout.

A tile's scale is s = fmt_max / amax, its values q = fp8(clip(x * s)) and x ~ q / s. The
GEMMs multiply the dequantised operands in the compute dtype with float32 accumulation:
exactly the fp8 products, computed on any backend (on a CPU this emulates fp8). The
quantised operands, not the inputs, are kept for the backward pass.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
F32 = jnp.float32
Tile = tuple[int | None, int | None]  # rows, columns of a tile; None: the whole axis


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a matmul quantises: `kind` "tensorwise" or "blockwise", the blockwise tile width
    `block_size`, and the tensorwise amax `history` length."""

    kind: str
    block_size: int = 128
    history: int = 16

    @property
    def grad_format(self):
        return E5M2 if self.kind == "tensorwise" else E4M3

    def tiles(self) -> tuple[Tile, Tile, Tile]:
        """(rows of an operand contracted along its columns, weight blocks, columns of an
        operand contracted along its rows)."""
        if self.kind == "tensorwise":
            return (None, None), (None, None), (None, None)
        b = self.block_size
        return (1, b), (b, b), (b, 1)


def recipe(config: ModelConfig) -> Recipe | None:
    """The model's fp8 recipe; None keeps every matmul in the compute dtype."""
    if config.fp8 == "none":
        return None
    return Recipe(config.fp8, config.fp8_block_size, config.fp8_history)


def fmt_max(fmt) -> float:
    """The largest finite value of an fp8 format: 448 for e4m3, 57344 for e5m2."""
    return float(jnp.finfo(fmt).max)


def _blocks(x: jax.Array, tile: Tile) -> jax.Array:
    """x [R, C] zero-padded to whole tiles, as [R / tr, tr, C / tc, tc]."""
    tr, tc = (n if t is None else t for n, t in zip(x.shape, tile))
    x = jnp.pad(x, ((0, -x.shape[0] % tr), (0, -x.shape[1] % tc)))
    return x.reshape(x.shape[0] // tr, tr, x.shape[1] // tc, tc)


def _unblock(blocks: jax.Array, shape: tuple[int, int]) -> jax.Array:
    rows, cols = blocks.shape[0] * blocks.shape[1], blocks.shape[2] * blocks.shape[3]
    return blocks.reshape(rows, cols)[: shape[0], : shape[1]]


def quantise(x: jax.Array, tile: Tile, fmt, amax: jax.Array | None = None):
    """(q [R, C] in `fmt`, float32 scale per tile) with x ~ q / scale.

    `amax` (a scalar) replaces each tile's own amax, as delayed scaling does; values past
    it saturate at the format's largest value. An all-zero tile gets scale 1.
    """
    blocks = _blocks(x.astype(F32), tile)
    if amax is None:
        amax = jnp.max(jnp.abs(blocks), axis=(1, 3))
    scale = jnp.where(amax > 0, fmt_max(fmt) / jnp.maximum(amax, 1e-30), 1.0)
    scale = jnp.broadcast_to(scale, (blocks.shape[0], blocks.shape[2])).astype(F32)
    limit = fmt_max(fmt)
    q = jnp.clip(blocks * scale[:, None, :, None], -limit, limit).astype(fmt)
    return _unblock(q, x.shape), scale


def dequantise(q: jax.Array, scale: jax.Array, tile: Tile, dtype) -> jax.Array:
    """q / scale per tile, in `dtype`."""
    blocks = _blocks(q.astype(F32), tile)
    return _unblock(blocks / scale[:, None, :, None], q.shape).astype(dtype)


def qdq(x: jax.Array, tile: Tile, fmt, amax: jax.Array | None = None) -> jax.Array:
    """x through `quantise` and back, in x's dtype."""
    return dequantise(*quantise(x, tile, fmt, amax), tile, x.dtype)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, preferred_element_type=F32)


def _delayed_amax(history: jax.Array, x: jax.Array):
    """(the amax to scale x by, x's own amax): the history's largest, or x's own while the
    history is empty or all zero (the first step, or no history given)."""
    now = jnp.max(jnp.abs(x)).astype(F32)
    if history.shape[0] == 0:
        return now, now
    past = jnp.max(history)
    return jnp.where(past > 0, past, now), now


def _scaling_amax(r: Recipe, history: jax.Array, x: jax.Array):
    """(the amax `quantise` takes: None for per-tile scales, x's own amax)."""
    if r.kind == "blockwise":
        return None, jnp.zeros((), F32)
    return _delayed_amax(history, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def matmul(x: jax.Array, w: jax.Array, history: jax.Array, r: Recipe) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype, every GEMM with fp8 operands.

    `history` [3, H] holds the amax histories of x, w and the output's gradient (tensorwise,
    newest first); H = 0 scales by the current amax. Its "gradient" is the next history:
    each row shifted by one with this step's amax in front.
    """
    return _matmul_fwd(x, w, history, r)[0]


def _matmul_fwd(x, w, history, r: Recipe):
    rows, weight, _ = r.tiles()
    x_amax, x_now = _scaling_amax(r, history[0], x)
    w_amax, w_now = _scaling_amax(r, history[1], w)
    xq = quantise(x, rows, E4M3, x_amax)
    wq = quantise(w, weight, E4M3, w_amax)
    y = _dot(dequantise(*xq, rows, x.dtype), dequantise(*wq, weight, w.dtype)).astype(x.dtype)
    return y, (xq, wq, history, x_now, w_now)


def _matmul_bwd(r: Recipe, residuals, dy):
    (xq, x_scale), (wq, w_scale), history, x_now, w_now = residuals
    rows, weight, columns = r.tiles()
    dtype, fmt = dy.dtype, r.grad_format
    g_amax, g_now = _scaling_amax(r, history[2], dy)
    dy_rows = qdq(dy, rows, fmt, g_amax)  # tiles along N, contracted by the input gradient
    dx = _dot(dy_rows, dequantise(wq, w_scale, weight, dtype).T)
    x = dequantise(xq, x_scale, rows, dtype)
    if r.kind == "blockwise":  # the weight gradient contracts M: tiles along the tokens
        x, dy_rows = qdq(x, columns, E4M3), qdq(dy, columns, fmt)
    dw = _dot(x.T, dy_rows)
    now = jnp.stack([x_now, w_now, g_now])[:, None]
    next_history = jnp.concatenate([now, history[:, :-1]], axis=1)[:, : history.shape[1]]
    return dx.astype(dtype), dw.astype(dtype), next_history


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def batched_matmul(x: jax.Array, w: jax.Array, r: Recipe) -> jax.Array:
    """x [G, M, K] @ w [G, K, N] -> [G, M, N]: `matmul` per group, scaled by current amax."""
    return jax.vmap(lambda a, b: matmul(a, b, jnp.zeros((3, 0), F32), r))(x, w)


def _operands(equation: str) -> tuple[str, str, str]:
    operands, out = equation.replace(" ", "").split("->")
    x_axes, k_axes = operands.split(",")
    return x_axes, k_axes, out


def is_matmul(equation: str) -> bool:
    """Whether the einsum `equation` is a matmul: no axis in both operands and the output."""
    x_axes, k_axes, out = _operands(equation)
    return not any(a in k_axes and a in out for a in x_axes)


def einsum(equation: str, x: jax.Array, kernel: jax.Array, history: jax.Array,
           r: Recipe) -> jax.Array:
    """jnp.einsum(equation, x, kernel) through `matmul`: x's free axes make the rows M, the
    contracted axes K (in x's order) and the kernel's free axes the columns N."""
    x_axes, k_axes, out = _operands(equation)
    contracted = "".join(a for a in x_axes if a in k_axes)
    x_free = "".join(a for a in x_axes if a not in k_axes)
    k_free = "".join(a for a in k_axes if a not in x_axes)
    x2 = jnp.einsum(f"{x_axes}->{x_free}{contracted}", x)
    k2 = jnp.einsum(f"{k_axes}->{contracted}{k_free}", kernel)
    m_shape, n_shape = x2.shape[: len(x_free)], k2.shape[len(contracted):]
    width = math.prod(x2.shape[len(x_free):])
    y = matmul(x2.reshape(-1, width), k2.reshape(width, -1), history, r)
    return jnp.einsum(f"{x_free}{k_free}->{out}", y.reshape(*m_shape, *n_shape))
