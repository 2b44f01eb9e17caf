"""Top-k routing and the balancing losses of mixture-of-experts layers, all in float32.

Conventions follow `docs/references.md`, "Mixture of experts":
- softmax: Mixtral / Qwen3. With norm_topk_prob, the weights are the softmax over the top-k
  logits (softmax, then renormalise over the chosen experts).
- sigmoid: DeepSeek-V3. s = sigmoid(logits); s + bias chooses the experts, the unbiased s of
  the chosen experts are the weights. Llama 4 is sigmoid top-1 without normalisation.
- group-limited selection: with a selection bias (DeepSeek-V3) a group's score is the sum of
  its top-2 biased scores, without one (DeepSeek-V2's softmax router) its best score, as in
  DeepSeek's reference `inference/model.py`; experts outside the best topk_group groups are
  masked with -inf, as there and in transformers 5.
"""

import jax
import jax.numpy as jnp

from jaxllm.config import MoEConfig


def router_scores(logits: jax.Array, router: str) -> jax.Array:
    """[..., E] float32 logits -> per-expert scores: softmax probabilities or sigmoids."""
    return jax.nn.softmax(logits, axis=-1) if router == "softmax" else jax.nn.sigmoid(logits)


def group_limited(selection: jax.Array, n_group: int, topk_group: int, *,
                  biased: bool) -> jax.Array:
    """Masks, with -inf, the experts outside the topk_group best of n_group groups.

    selection: [T, E] scores used for choosing. A group scores the sum of its top-2 when the
    scores are `biased` (DeepSeek-V3), else its best one (DeepSeek-V2).
    """
    tokens, num_experts = selection.shape
    grouped = selection.reshape(tokens, n_group, num_experts // n_group)
    if biased:
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [T, G]
    else:
        group_scores = grouped.max(-1)
    _, best = jax.lax.top_k(group_scores, topk_group)  # [T, topk_group]
    keep = jnp.zeros((tokens, n_group), bool).at[jnp.arange(tokens)[:, None], best].set(True)
    return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(tokens, num_experts)


def route(logits: jax.Array, bias: jax.Array | None, cfg: MoEConfig):
    """Chooses experts_per_token experts per token and their combine weights.

    Args:
      logits: [T, E] router logits, float32.
      bias: [E] selection-only bias (sigmoid router), or None.
      cfg: the MoE config.

    Returns:
      (weights [T, K] float32, experts [T, K] int32, scores [T, E]).
    """
    scores = router_scores(logits, cfg.router)
    selection = scores if bias is None else scores + bias
    if cfg.n_group > 1:
        selection = group_limited(selection, cfg.n_group, cfg.topk_group,
                                  biased=bias is not None)
    _, experts = jax.lax.top_k(selection, cfg.experts_per_token)
    weights = jnp.take_along_axis(scores, experts, axis=-1)  # unbiased
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights * cfg.routed_scaling_factor, experts.astype(jnp.int32), scores


def expert_counts(experts: jax.Array, num_experts: int) -> jax.Array:
    """[..., T, K] expert ids -> [..., E] float32 number of token-choices per expert."""
    one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)
    return one_hot.sum(axis=(-3, -2))


def balance_loss(experts: jax.Array, scores: jax.Array) -> jax.Array:
    """E/(K T) * sum_i count_i * P_i over the leading axes of [..., T, K] and [..., T, E].

    P_i is the mean of the normalised score s_i / sum_j s_j. Over a whole batch this is the
    Switch load-balance loss E * sum_i f_i P_i, with f_i the fraction of all k choices that
    went to expert i (1.0 when balanced; HF Mixtral's f sums to k instead). Per sequence it
    is the DeepSeek-V3 sequence-wise loss. Returns the mean over the leading axes.
    """
    tokens, k = experts.shape[-2:]
    num_experts = scores.shape[-1]
    affinity = scores / scores.sum(-1, keepdims=True)
    loss = (expert_counts(experts, num_experts) * affinity.mean(-2)).sum(-1)
    return jnp.mean(loss * num_experts / (k * tokens))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE: the mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3 aux-loss-free balancing: b += rate * sign(mean_load - load), per expert.

    bias and load: [..., E], load counted over the whole batch.
    """
    return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load)
