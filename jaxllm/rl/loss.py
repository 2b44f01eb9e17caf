"""GRPO-family losses: group advantages, clipped ratios, KL estimators, aggregation modes.

All formulas follow `docs/references.md`, "GRPO and its variants". Per-token arrays
are [B, S] with `mask` 1 on the completion tokens whose log-probs count; the B rows are
consecutive groups of `group_size` completions of one prompt.
"""

import jax
import jax.numpy as jnp

from jaxllm.config import GRPOConfig

LOG_RATIO_CLAMP = 20.0  # verl clamps log-ratios to +-20 before exp ...
KL_CLAMP = 10.0  # ... and the k3 estimate to +-10


def _groups(rewards, group_size: int):
    """[N] -> [N / group_size, group_size], consecutive rows per prompt."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards: shape {rewards.shape} is not [N] with N a multiple of "
                         f"group_size={group_size}")
    return rewards.reshape(-1, group_size)


def group_advantages(rewards, group_size: int, scale_rewards: bool = True, eps: float = 1e-4):
    """[N] rewards -> [N] advantages r - mean(r), over each group of `group_size`.

    With `scale_rewards` (GRPO), divided by std(r) + eps as in TRL, whose std is the unbiased
    one (ddof=1); without (Dr. GRPO), mean-centred only. Equal rewards give advantage 0.
    """
    r = _groups(rewards, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale_rewards:
        centred = centred / (r.std(axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1)


def informative_groups(rewards, group_size: int):
    """[N] bool, False for every member of a group whose rewards are all equal (DAPO's
    dynamic sampling drops those groups: they carry no signal)."""
    r = _groups(rewards, group_size)
    spread = r.max(axis=1) > r.min(axis=1)
    return jnp.repeat(spread, group_size)


def overlong_penalty(lengths, max_len: int, buffer: int):
    """DAPO's soft overlong penalty of completions with `lengths` tokens: 0 up to
    max_len - buffer, then a linear ramp to -1 at max_len, and -1 beyond."""
    lengths = jnp.asarray(lengths, jnp.float32)
    soft = max_len - buffer
    ramp = (soft - lengths) / max(buffer, 1)
    return jnp.where(lengths <= soft, 0.0, jnp.where(lengths <= max_len, ramp, -1.0))


def kl_divergence(logp, ref_logp, estimator: str = "k3"):
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled tokens' log-probs.

    k1 = log r, k2 = (log r)^2 / 2, k3 = 1/r + log r - 1 >= 0, with r = pi_theta / pi_ref.
    """
    log_ratio = jnp.clip(logp - ref_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    if estimator == "k3":
        # expm1: exact near r = 1, where exp(x) - 1 + x would round below 0
        return jnp.clip(jnp.expm1(-log_ratio) + log_ratio, -KL_CLAMP, KL_CLAMP)
    raise ValueError(f"kl_estimator: unknown {estimator!r}; expected k1, k2 or k3")


def masked_mean(x, mask):
    """The mean of `x` over the entries where `mask` is 1 (0 when there are none)."""
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def aggregate(per_token, mask, loss_type: str, max_len: int):
    """Reduces [B, S] per-token losses to a scalar.

    grpo, gspo: mean over sequences of each one's token-mean.
    dapo: mean over all completion tokens of the batch.
    dr_grpo: sum over tokens / (B * max_len), a constant normaliser.
    """
    total = per_token * mask
    if loss_type in ("grpo", "gspo"):
        return (total.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).mean()
    if loss_type == "dapo":
        return total.sum() / jnp.maximum(mask.sum(), 1.0)
    if loss_type == "dr_grpo":
        return total.sum() / (mask.shape[0] * max_len)
    raise ValueError(f"loss_type: unknown {loss_type!r}; expected grpo, dapo, dr_grpo or gspo")


def grpo_loss(logp, old_logp, advantages, mask, cfg: GRPOConfig, ref_logp=None, weights=None):
    """The clipped surrogate, times the importance weights, plus beta * KL, aggregated by
    `cfg.loss_type`, and metrics.

    logp, old_logp, ref_logp, mask, weights: [B, S]; advantages: [B]. The ratio is per token,
    or for gspo per sequence, exp(token-mean of log rho), clipped to
    [1 - epsilon_low, 1 + epsilon_high]. `weights` (constants; None: 1) correct for a sampler
    that is not pi_old (`jaxllm.rl.importance`). Returns (loss, {clip_fraction, ratio_mean,
    kl}).
    """
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError("ref_logprobs: required when grpo.beta > 0")
    mask = mask.astype(jnp.float32)
    log_ratio = logp - old_logp
    if cfg.loss_type == "gspo":
        sequence = (log_ratio * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
        log_ratio = jnp.broadcast_to(sequence[:, None], log_ratio.shape)
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = advantages[:, None].astype(jnp.float32)
    clipped = jnp.clip(ratio, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    if weights is not None:
        per_token = per_token * jax.lax.stop_gradient(weights)
    was_clipped = ((ratio < 1.0 - cfg.epsilon_low) & (adv < 0)) | (
        (ratio > 1.0 + cfg.epsilon_high) & (adv > 0)
    )
    metrics = {
        "clip_fraction": masked_mean(was_clipped, mask),
        "ratio_mean": masked_mean(jax.lax.stop_gradient(ratio), mask),
    }
    if cfg.beta > 0:
        kl = kl_divergence(logp, ref_logp, cfg.kl_estimator)
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = masked_mean(jax.lax.stop_gradient(kl), mask)
    return aggregate(per_token, mask, cfg.loss_type, cfg.max_completion_len), metrics
