"""The one parameterised linear map every layer uses."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Einsum(nn.Module):
    """y = einsum(equation, x, kernel) with a float32 kernel of `shape`.

    Attributes:
      shape: the kernel's shape.
      axes: a logical axis name (or None) per kernel axis, for sharding.
      equation: e.g. "bse,ehd->bshd"; the kernel is the second operand.
      fan_in: the kernel axes that are contracted with the input; they set the
        fan-in of the Lecun-normal init.
      dtype: the compute dtype.
      use_bias: add a float32 `bias` over the kernel's output axes (the axes not in fan_in).
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    equation: str
    fan_in: Sequence[int] = (0,)
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_out = tuple(i for i in range(len(self.shape)) if i not in self.fan_in)
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=tuple(self.fan_in), out_axis=fan_out
        )
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape)
        y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
        if not self.use_bias:
            return y
        axes = tuple(self.axes[i] for i in fan_out)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, axes),
                          tuple(self.shape[i] for i in fan_out))
        return y + bias.astype(self.dtype)
