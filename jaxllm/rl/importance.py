"""Off-policy correction: importance weights of the trainer's policy over the sampler's.

The rollout's tokens o_t come from the sampler's distribution pi_s (another compute dtype,
another kernel), while the update assumes pi_old, the trainer's policy before the update.
With r_t = pi_old(o_t) / pi_s(o_t) on the completion tokens and a cap C, TRL's modes
(`vllm_importance_sampling_mode`) weight the per-token policy loss by

    token_truncate:     w_t = min(r_t, C)
    token_mask:         w_t = r_t if r_t <= C else 0
    sequence_truncate:  w = min(prod_t r_t, C), on every token of the sequence
    sequence_mask:      w = prod_t r_t if prod_t r_t <= C else 0

and "none" by 1. DeepSeek-V3.2's off-policy sequence masking optionally drops, on top, the
sequences with a negative advantage that pi_theta has moved far from the sampler. Formulas
and sources: `docs/rl.md`, "Off-policy correction".
"""

import jax
import jax.numpy as jnp

from jaxllm.rl.loss import LOG_RATIO_CLAMP, kl_divergence, masked_mean

MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _log_ratios(old_logp, sampler_logp, mask, sequence: bool):
    """[B, S] log r_t on the completion tokens (0 elsewhere), or for `sequence` each row's
    sum log prod_t r_t on every column; clamped to +-LOG_RATIO_CLAMP."""
    log_ratio = (old_logp - sampler_logp) * mask
    if sequence:
        log_ratio = jnp.broadcast_to(log_ratio.sum(-1, keepdims=True), log_ratio.shape)
    return jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def importance_weights(old_logp, sampler_logp, mask, *, mode: str, cap: float):
    """Stop-gradient weights [B, S] of the per-token policy loss, and metrics.

    old_logp, sampler_logp: [B, S] log-probs of the rollout's tokens under the trainer's
    pi_old and under the sampler; mask: [B, S], 1 on the completion tokens that count.
    Metrics (all on those tokens):
      offpolicy/kl: the k3 estimate of KL(pi_s || pi_old), r - 1 - log r per token (the
        samples come from pi_s, so it is unbiased and >= 0), its token mean;
      offpolicy/weight_mean: the token mean of w;
      offpolicy/capped_fraction: the share of tokens (token modes and "none") or of
        sequences (sequence modes) whose ratio exceeds C, which the mode truncates or masks.
    """
    if mode not in MODES:
        raise ValueError(f"importance_sampling: unknown {mode!r}; expected one of {MODES}")
    old_logp, sampler_logp = jax.lax.stop_gradient((old_logp, sampler_logp))
    mask = mask.astype(jnp.float32)
    sequence = mode.startswith("sequence")
    ratio = jnp.exp(_log_ratios(old_logp, sampler_logp, mask, sequence))
    capped = ratio > cap
    if mode == "none":
        weights = jnp.ones_like(ratio)
    elif mode.endswith("truncate"):
        weights = jnp.minimum(ratio, cap)
    else:
        weights = jnp.where(capped, 0.0, ratio)
    if sequence:
        rows = (mask.sum(-1) > 0).astype(jnp.float32)
        capped_fraction = masked_mean(capped[:, 0], rows)
    else:
        capped_fraction = masked_mean(capped, mask)
    metrics = {
        "offpolicy/kl": masked_mean(kl_divergence(sampler_logp, old_logp, "k3"), mask),
        "offpolicy/weight_mean": masked_mean(weights, mask),
        "offpolicy/capped_fraction": capped_fraction,
    }
    return weights, metrics


def off_policy_sequence_mask(logp, sampler_logp, advantages, mask, *, threshold: float):
    """DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, eq. 9), [B, 1] and metrics.

    0 for a sequence with a negative advantage whose mean log(pi_s / pi_theta) over its
    completion tokens (a k1 estimate of KL(pi_s || pi_theta)) exceeds `threshold`, else 1.
    logp, sampler_logp, mask: [B, S]; advantages: [B]. Metric offpolicy/masked_sequences:
    the share of sequences with completion tokens that it drops.
    """
    mask = mask.astype(jnp.float32)
    log_ratio = jax.lax.stop_gradient(sampler_logp - logp) * mask
    divergence = log_ratio.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    dropped = (advantages < 0) & (divergence > threshold)
    rows = (mask.sum(-1) > 0).astype(jnp.float32)
    keep = 1.0 - dropped.astype(jnp.float32)
    return keep[:, None], {"offpolicy/masked_sequences": masked_mean(dropped, rows)}
