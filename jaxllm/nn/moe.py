"""The mixture-of-experts feed-forward layer: router, routed SwiGLU experts, shared experts.

h' = sum_shared FFN(h) + sum_i g_i FFN_i(h) (DeepSeek-V3 eq. 12; the residual is added by
the block), or with `weight_inputs` (Llama 4) sum_shared FFN(h) + FFN_i(g_i h). Routing is in float32 (`jaxllm.nn.router`); the grouped matmul is in
`jaxllm.nn.experts`. On a mesh with expert > 1, `jaxllm.nn.expert_parallel` runs it with the
experts sharded and the tokens exchanged by all_to_all.

Collections besides "params":
- "moe_bias": `e_score_correction_bias` [E] of the sigmoid router, the selection-only bias
  of aux-loss-free balancing. It is state, not a parameter: the train step updates it with
  `router.bias_update` outside the optimizer.
- "moe_metrics" (sown when mutable): `tokens_per_expert` [E], the unweighted
  `load_balance_loss`, `seq_aux_loss`, `router_z_loss`, the `dropped_fraction`, and
  `aux_loss`, their weighted sum, which the train step adds to the loss.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import MoEConfig
from jaxllm.nn import expert_parallel, router
from jaxllm.nn.experts import routed_experts
from jaxllm.nn.fp8 import Recipe
from jaxllm.nn.linear import Einsum
from jaxllm.nn.mlp import SwiGLU


def capacity(cfg: MoEConfig, tokens: int) -> int:
    """Slots per expert: all T tokens when dropless, else ceil(factor * T * k / E) <= T."""
    if cfg.dispatch == "dropless":
        return tokens
    slots = math.ceil(cfg.capacity_factor * tokens * cfg.experts_per_token / cfg.num_experts)
    return min(tokens, slots)


class MoE(nn.Module):
    """A routed mixture of SwiGLU experts plus optional shared experts.

    Attributes:
      config: the MoE config.
      dtype: the compute dtype of the experts; the router runs in float32.
      fp8: the fp8 recipe of the routed and shared experts' matmuls; the router stays float32.
    """

    config: MoEConfig
    dtype: jnp.dtype = jnp.float32
    fp8: Recipe | None = None

    def _expert_kernel(self, name, shape, axes, in_axis, out_axis):
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis, batch_axis=0
        )
        kernel = self.param(name, nn.with_logical_partitioning(init, axes), shape)
        return kernel.astype(self.dtype)

    def _bias(self) -> jax.Array | None:
        if self.config.router != "sigmoid":
            return None
        shape = (self.config.num_experts,)
        bias = self.variable("moe_bias", "e_score_correction_bias", jnp.zeros, shape, jnp.float32)
        return bias.value

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, S, D] -> [B, S, D]."""
        cfg = self.config
        batch, length, embed = x.shape
        tokens = batch * length
        logits = Einsum(
            (embed, cfg.num_experts), ("embed", None), "bsd,de->bse", dtype=jnp.float32,
            name="router",
        )(x)  # [B, S, E] float32
        weights, experts, scores = router.route(logits.reshape(tokens, -1), self._bias(), cfg)
        wi = self._expert_kernel(
            "wi", (cfg.num_experts, embed, 2, cfg.expert_dim), ("expert", "embed", None, "mlp"),
            in_axis=1, out_axis=(2, 3),
        )
        wo = self._expert_kernel(
            "wo", (cfg.num_experts, cfg.expert_dim, embed), ("expert", "mlp", "embed"),
            in_axis=1, out_axis=2,
        )
        flat_x = x.reshape(tokens, embed).astype(self.dtype)
        if cfg.weight_inputs:  # Llama 4: FFN_i(g_i h) for the token's one expert i
            flat_x, weights = flat_x * weights.astype(self.dtype), jnp.ones_like(weights)
        mesh = expert_parallel.expert_mesh(tokens) if cfg.expert_parallel else None
        if mesh is None:
            y, dropped = routed_experts(
                flat_x, weights, experts, wi, wo, capacity=capacity(cfg, tokens), kernel=cfg.kernel,
                fp8=self.fp8,
            )
        else:
            y, dropped = expert_parallel.routed_experts_parallel(
                flat_x, weights, experts, wi, wo, mesh=mesh, cfg=cfg, fp8=self.fp8
            )
        y = y.reshape(batch, length, embed)
        if cfg.num_shared_experts:
            y = y + SwiGLU(cfg.resolved_shared_dim, self.dtype, self.fp8, name="shared")(x)
        experts = experts.reshape(batch, length, -1)
        self._sow_metrics(logits, experts, scores.reshape(logits.shape), dropped)
        return y

    def _sow_metrics(self, logits, experts, scores, dropped) -> None:
        """logits, scores [B, S, E]; experts [B, S, K]."""
        cfg = self.config
        flat_experts = experts.reshape(-1, experts.shape[-1])  # [T, K]
        metrics = {
            "tokens_per_expert": router.expert_counts(flat_experts, cfg.num_experts),
            "load_balance_loss": router.balance_loss(
                flat_experts, scores.reshape(-1, scores.shape[-1])
            ),
            "seq_aux_loss": router.balance_loss(experts, scores),
            "router_z_loss": router.router_z_loss(logits),
            "dropped_fraction": dropped,
        }
        metrics["aux_loss"] = (
            cfg.load_balance_loss * metrics["load_balance_loss"]
            + cfg.seq_aux_loss * metrics["seq_aux_loss"]
            + cfg.router_z_loss * metrics["router_z_loss"]
        )
        for name, value in metrics.items():
            self.sow("moe_metrics", name, value, init_fn=lambda: 0.0, reduce_fn=lambda _, new: new)
