"""Feed-forward layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import LoRAConfig
from jaxllm.nn.fp8 import Recipe
from jaxllm.nn.linear import Einsum
from jaxllm.nn.lora import for_target


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up), projected back by W_down (Shazeer 2020).

    Attributes:
      hidden_dim: the width of the gated hidden layer.
      dtype: the compute dtype; parameters are float32.
      fp8: the fp8 recipe of both matmuls (`Einsum`); None: none.
      lora: low-rank adapters on both matmuls when its targets name mlp; None: none.
    """

    hidden_dim: int
    dtype: jnp.dtype = jnp.float32
    fp8: Recipe | None = None
    lora: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        embed_dim = x.shape[-1]
        gate_up = Einsum(
            (embed_dim, 2, self.hidden_dim), ("embed", None, "mlp"), "bse,egf->bsgf",
            dtype=self.dtype, fp8=self.fp8,
            lora=for_target(self.lora, "mlp"), name="wi",
        )(x)  # [B, S, 2, F]: gate and up projections in one matmul
        gate_up = nn.with_logical_constraint(gate_up, ("act_batch", "act_length", None, "act_mlp"))
        hidden = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
        return Einsum(
            (self.hidden_dim, embed_dim), ("mlp", "embed"), "bsf,fe->bse", dtype=self.dtype,
            fp8=self.fp8, lora=for_target(self.lora, "mlp"), name="wo",
        )(hidden)
