"""Casting a float32 parameter to the compute dtype where a layer reads it."""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _opaque(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`x` unchanged, passed through an optimization barrier as its integer bits viewed as
    `shape`: to the compiler, a use of `x` at its full width that no precision pass can
    narrow and no layout pass can move out of a loop."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(shape)
    bits = jax.lax.optimization_barrier(bits).reshape(x.shape)
    return jax.lax.bitcast_convert_type(bits, x.dtype)


@_opaque.defjvp
def _opaque_jvp(shape, primals, tangents):
    return _opaque(primals[0], shape), tangents[0]


def _folded_shape(shape: Sequence[int], axes: Sequence[str | None]) -> tuple[int, ...]:
    """`shape` with every axis that the current logical rules shard over no mesh axis
    folded into the axis before it: the same split over devices, fewer axes."""
    folded = [shape[0]]
    for size, mesh_axes in zip(shape[1:], tuple(nn.logical_to_mesh_axes(axes))[1:]):
        if mesh_axes is None:
            folded[-1] *= size
        else:
            folded.append(size)
    return tuple(folded)


def cast_param(param: jax.Array, dtype: jnp.dtype, axes: Sequence[str | None]) -> jax.Array:
    """`param.astype(dtype)`, computed where it is called; `axes` are its logical axis names.

    In a scanned layer stack, a float32 parameter whose only use is this cast lets the TPU
    compiler's bfloat16 propagation narrow the loop's whole parameter stack: one bf16 copy
    of every layer's weights, made before the forward loop and alive until the end of the
    backward one. Giving the float32 slice a use that cannot be narrowed keeps the cast per
    layer, inside the loop; viewing it with its unsharded axes folded into the axes before
    them keeps the compiler from re-laying out the whole float32 stack before the loop
    instead (SwiGLU's size-2 gate/up axis otherwise does). The values are those of `astype`.
    """
    dtype = jnp.dtype(dtype)
    if param.dtype != jnp.float32 or dtype == param.dtype:
        return param.astype(dtype)
    return _opaque(param, _folded_shape(param.shape, axes)).astype(dtype)
