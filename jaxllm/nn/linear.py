"""The one parameterised linear map every layer uses."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import LoRAConfig
from jaxllm.nn import fp8 as fp8_lib
from jaxllm.nn import lora as lora_lib
from jaxllm.nn.param_cast import cast_param


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
      fp8: multiply in fp8 with this recipe (`jaxllm.nn.fp8`) when the equation is a matmul
        (no axis shared by both operands and the output); None: in the compute dtype.
      lora: add a low-rank adapter (`jaxllm.nn.lora.Adapter`) in the compute dtype; fan_in
        must then be the kernel's leading axes. None: none.

    A tensorwise fp8 layer scales by the amax histories `amax_history` [3, H] in the
    "fp8_meta" collection when the caller passes it (the train step updates them), and by
    the current amax otherwise.
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    equation: str
    fan_in: Sequence[int] = (0,)
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = False
    fp8: fp8_lib.Recipe | None = None
    lora: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_out = tuple(i for i in range(len(self.shape)) if i not in self.fan_in)
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=tuple(self.fan_in), out_axis=fan_out
        )
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape)
        x, kernel = x.astype(self.dtype), cast_param(kernel, self.dtype, self.axes)
        if self.fp8 is None or not fp8_lib.is_matmul(self.equation):
            y = jnp.einsum(self.equation, x, kernel)
        else:
            y = fp8_lib.einsum(self.equation, x, kernel, self._amax_history(), self.fp8)
        if self.use_bias:
            axes = tuple(self.axes[i] for i in fan_out)
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, axes),
                              tuple(self.shape[i] for i in fan_out))
            y = y + bias.astype(self.dtype)
        if self.lora is None:
            return y
        if tuple(self.fan_in) != tuple(range(len(self.fan_in))):
            raise ValueError(f"lora: fan_in {self.fan_in} must be the kernel's leading axes")
        adapter = lora_lib.Adapter(self.lora, self.shape, self.axes, self.equation,
                                   len(self.fan_in), self.dtype, name=lora_lib.SCOPE)
        return y + adapter(x)

    def _amax_history(self) -> jax.Array:
        """[3, H] amax histories of the input, kernel and output gradient; [3, 0] (current
        scaling) for blockwise layers and callers that pass no "fp8_meta"."""
        r = self.fp8
        if r.kind != "tensorwise" or not (
            self.is_initializing() or self.has_variable("fp8_meta", "amax_history")
        ):
            return jnp.zeros((3, 0), jnp.float32)
        history = self.variable("fp8_meta", "amax_history", jnp.zeros, (3, r.history),
                                jnp.float32)
        return history.value
