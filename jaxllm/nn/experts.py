"""Routed SwiGLU experts: sort token-choices by expert, one grouped matmul, unsort, combine.

Two kernels compute the grouped matmul (`../shared/REFERENCES.md`, "Dropless MoE via grouped
matmul" and the CPU measurement below it):
- "ragged_dot": `jax.lax.ragged_dot` over the sorted rows; for TPU and GPU.
- "sorted_einsum": the sorted rows scattered into padded [E, C, D] blocks and a batched
  einsum; dense speed on CPU. Dropless when C covers the largest group (C = T always does).
"""

import jax
import jax.numpy as jnp

from jaxllm.nn import router


def _swiglu(gate_up: jax.Array) -> jax.Array:
    """[..., 2, F] gate and up projections -> [..., F]."""
    return jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]


def ragged_swiglu(x_sorted, group_sizes, wi, wo):
    """x_sorted [M, D] rows grouped by expert, group_sizes [E], wi [E, D, 2, F], wo [E, F, D]
    -> [M, D], each row through its own expert."""
    num_experts, embed, _, hidden = wi.shape
    gate_up = jax.lax.ragged_dot(x_sorted, wi.reshape(num_experts, embed, 2 * hidden), group_sizes)
    return jax.lax.ragged_dot(_swiglu(gate_up.reshape(-1, 2, hidden)), wo, group_sizes)


def padded_swiglu(x_sorted, sorted_experts, slots, wi, wo, capacity: int):
    """Like `ragged_swiglu`, through padded [E, C, D] blocks.

    sorted_experts [M] is each row's expert and slots [M] its place in that expert's group;
    rows with slot >= capacity are dropped (their output is zero).
    """
    num_experts = wi.shape[0]
    blocks = jnp.zeros((num_experts, capacity, x_sorted.shape[-1]), x_sorted.dtype)
    blocks = blocks.at[sorted_experts, slots].set(x_sorted, mode="drop")  # [E, C, D]
    hidden = _swiglu(jnp.einsum("ecd,edgf->ecgf", blocks, wi))  # [E, C, F]
    out = jnp.einsum("ecf,efd->ecd", hidden, wo)
    rows = out[sorted_experts, jnp.minimum(slots, capacity - 1)]
    return rows * (slots < capacity)[:, None]


def routed_experts(x, weights, experts, wi, wo, *, capacity: int, kernel: str):
    """Sum over each token's chosen experts of weight * SwiGLU_expert(x).

    Args:
      x: [T, D] tokens.
      weights, experts: [T, K] combine weights and expert ids.
      wi, wo: [E, D, 2, F] and [E, F, D] expert kernels, in the compute dtype.
      capacity: slots per expert; choices past it are dropped. T drops nothing.
      kernel: "ragged_dot" or "sorted_einsum".

    Returns:
      ([T, D] output, the fraction of token-choices dropped).
    """
    tokens, k = experts.shape
    num_experts = wi.shape[0]
    # Choice-major order: every token's first choice takes a slot before any second choice,
    # so capacity drops the lower-ranked choices first (GShard).
    flat = experts.T.reshape(-1)  # [K*T], index k*T + t
    order = jnp.argsort(flat, stable=True)
    sorted_experts = flat[order]
    group_sizes = router.expert_counts(experts, num_experts).astype(jnp.int32)
    starts = jnp.cumsum(group_sizes) - group_sizes
    slots = jnp.arange(k * tokens) - starts[sorted_experts]  # place within the expert's group
    kept = slots < capacity
    x_sorted = x[order % tokens]  # [K*T, D]
    if kernel == "ragged_dot":
        out = ragged_swiglu(x_sorted, group_sizes, wi, wo) * kept[:, None]
    else:
        out = padded_swiglu(x_sorted, sorted_experts, slots, wi, wo, capacity)
    out = out[jnp.argsort(order)].reshape(k, tokens, -1)  # unsort: [K, T, D]
    y = jnp.einsum("ktd,tk->td", out, weights.astype(out.dtype))
    return y, jnp.mean(~kept, dtype=jnp.float32)
