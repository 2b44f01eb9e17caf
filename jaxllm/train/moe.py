"""The train step's MoE bookkeeping: aux losses, aux-loss-free bias updates, per-layer metrics.

Works on the "moe_metrics" tree the MoE layers sow and the "moe_bias" tree of their
selection biases (see `jaxllm.nn.moe`). Both are empty for a dense model.
"""

import jax.numpy as jnp
from flax import traverse_util

from jaxllm.config import ModelConfig
from jaxllm.nn import router
from jaxllm.nn.transformer import layer_number


def aux_loss(moe_metrics) -> jnp.ndarray:
    """The weighted aux losses of all MoE layers, summed."""
    flat = traverse_util.flatten_dict(moe_metrics)
    total = jnp.zeros((), jnp.float32)
    return sum((v.sum() for k, v in flat.items() if k[-1] == "aux_loss"), total)


def update_biases(moe_bias, moe_metrics, rate: float):
    """DeepSeek-V3 aux-loss-free balancing of every layer's selection bias, with the load
    (`tokens_per_expert`, summed over the whole batch) sown next to it."""
    flat = traverse_util.flatten_dict(moe_metrics)
    updated = {
        path: router.bias_update(bias, flat[path[:-1] + ("tokens_per_expert",)], rate)
        for path, bias in traverse_util.flatten_dict(moe_bias).items()
    }
    return traverse_util.unflatten_dict(updated) if updated else moe_bias


def step_metrics(config: ModelConfig, moe_metrics, micro_batches: int) -> dict:
    """Scalars per MoE layer, `moe/layer_{l}/...`: each expert's load fraction, max/mean load,
    dropped fraction and the unweighted aux losses; plus `moe/aux_loss`, the weighted total.

    moe_metrics holds sums over `micro_batches`; all but the loads are averaged.
    """
    out = {}
    for path, value in traverse_util.flatten_dict(moe_metrics).items():
        name = path[-1]
        loads = name == "tokens_per_expert"
        per_layer = value.reshape(-1, value.shape[-1]) if loads else value.reshape(-1)
        for index, layer_value in enumerate(per_layer):
            prefix = f"moe/layer_{layer_number(config, path[1:], index)}"
            if loads:
                fractions = layer_value / layer_value.sum()
                out[f"{prefix}/load_max_over_mean"] = fractions.max() * fractions.size
                out.update({f"{prefix}/load_fraction_{e}": f for e, f in enumerate(fractions)})
            else:
                out[f"{prefix}/{name}"] = layer_value / micro_batches
    if moe_metrics:
        out["moe/aux_loss"] = aux_loss(moe_metrics) / micro_batches
    return out
