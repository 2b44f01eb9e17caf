"""GRPO losses against direct NumPy implementations of the formulas in docs/references.md."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import Config, ConfigError
from jaxllm.config import GRPOConfig, apply_overrides
from jaxllm.rl.loss import (
    group_advantages,
    grpo_loss,
    informative_groups,
    kl_divergence,
    overlong_penalty,
)

B, S, L_MAX = 6, 7, 9


def reference_loss(logp, old, ref, adv, mask, cfg: GRPOConfig) -> float:
    """The objective written out sequence by sequence, in float64."""
    per_sequence, all_tokens = [], []
    for i in range(len(adv)):
        keep = mask[i] > 0
        log_rho = logp[i, keep] - old[i, keep]
        if cfg.loss_type == "gspo":  # s_i = exp(mean_t log rho_it), one ratio per sequence
            log_rho = np.full_like(log_rho, log_rho.mean())
        rho = np.exp(log_rho)
        surrogate = np.minimum(
            rho * adv[i], np.clip(rho, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high) * adv[i]
        )
        ref_over_pi = np.exp(ref[i, keep] - logp[i, keep])
        k3 = ref_over_pi - np.log(ref_over_pi) - 1
        ell = -surrogate + cfg.beta * k3
        per_sequence.append(ell.mean())
        all_tokens.append(ell)
    tokens = np.concatenate(all_tokens)
    if cfg.loss_type in ("grpo", "gspo"):  # mean_i (1/|o_i|) sum_t
        return np.mean(per_sequence)
    if cfg.loss_type == "dapo":  # (1 / sum_i |o_i|) sum_i sum_t
        return tokens.sum() / len(tokens)
    return tokens.sum() / (len(adv) * L_MAX)  # dr_grpo: (1 / (G L_max)) sum_i sum_t


def numeric_grad(fn, x, h=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (fn(x + step) - fn(x - step)) / (2 * h)
    return grad


def random_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, (B, S))
    old = logp + rng.normal(0, 0.3, (B, S))  # ratios spread across the clip range
    ref = logp + rng.normal(0, 0.3, (B, S))
    adv = rng.normal(size=B)
    mask = (rng.uniform(size=(B, S)) < 0.7).astype(np.float64)
    mask[:, 0] = 1  # every sequence has a token
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_loss_and_gradient_match_numpy(loss_type):
    cfg = GRPOConfig(
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=0.04,
        max_completion_len=L_MAX,
    )
    logp, old, ref, adv, mask = random_inputs()

    def loss(x):
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        return grpo_loss(x, f32(old), f32(adv), f32(mask), cfg, f32(ref))[0]

    got_loss, got_grad = jax.value_and_grad(loss)(jnp.asarray(logp, jnp.float32))
    want = lambda x: reference_loss(x, old, ref, adv, mask, cfg)  # noqa: E731
    np.testing.assert_allclose(got_loss, want(logp), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_grad, numeric_grad(want, logp), rtol=1e-4, atol=1e-6)
    assert np.abs(got_grad).max() > 1e-3
    np.testing.assert_array_equal(got_grad[mask == 0], 0)


def test_clipping_is_active_in_the_random_inputs():
    """The ratios of `random_inputs` fall on both sides of the clip range, so the tests
    above exercise the clipped branch."""
    cfg = GRPOConfig(epsilon_low=0.2, epsilon_high=0.28)
    logp, old, ref, adv, mask = random_inputs()
    _, metrics = grpo_loss(logp, old, jnp.asarray(adv), mask, cfg)
    rho = np.exp(logp - old)
    want = (((rho < 0.8) & (adv[:, None] < 0)) | ((rho > 1.28) & (adv[:, None] > 0)))
    np.testing.assert_allclose(metrics["clip_fraction"], want[mask > 0].mean(), rtol=1e-6)
    assert 0 < metrics["clip_fraction"] < 1


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_on_policy_ratio_is_one_and_gradient_is_the_policy_gradient(loss_type):
    """mu = 1: pi_old = stop_grad(pi_theta), so rho == 1 and d loss / d logp = -A / norm."""
    cfg = GRPOConfig(loss_type=loss_type, max_completion_len=L_MAX)
    logp, _, _, adv, mask = random_inputs(1)
    logp, adv, mask = (jnp.asarray(a, jnp.float32) for a in (logp, adv, mask))

    def loss(x):
        return grpo_loss(x, jax.lax.stop_gradient(x), adv, mask, cfg)

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(logp)
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_fraction"] == 0.0
    norm = {
        "grpo": B * mask.sum(1, keepdims=True),
        "gspo": B * mask.sum(1, keepdims=True),
        "dapo": mask.sum(),
        "dr_grpo": B * L_MAX,
    }[loss_type]
    np.testing.assert_allclose(grad, -adv[:, None] * mask / norm, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(value, (-adv[:, None] * mask / norm).sum(), rtol=1e-5, atol=1e-7)


def test_group_advantages_match_numpy():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0])
    groups = rewards.reshape(3, 4)
    centred = groups - groups.mean(1, keepdims=True)
    scaled = centred / (groups.std(1, ddof=1, keepdims=True) + 1e-4)  # TRL
    np.testing.assert_allclose(group_advantages(rewards, 4), scaled.ravel(), rtol=1e-6)
    np.testing.assert_allclose(
        group_advantages(rewards, 4, scale_rewards=False), centred.ravel(), rtol=1e-6
    )
    with pytest.raises(ValueError, match="group_size=5"):
        group_advantages(rewards, 5)


def test_identical_reward_groups_are_dropped_and_carry_no_gradient():
    rewards = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])  # groups of 3: equal, then mixed
    np.testing.assert_array_equal(informative_groups(rewards, 3), [0, 0, 0, 1, 1, 1])
    logp, old, _, _, mask = random_inputs(2)
    for scale in (True, False):
        adv = group_advantages(rewards, 3, scale_rewards=scale)
        grad = jax.grad(
            lambda x: grpo_loss(x, old, adv, mask, GRPOConfig(loss_type="dapo"))[0]
        )(jnp.asarray(logp, jnp.float32))
        np.testing.assert_array_equal(grad[:3], 0)
        assert np.abs(grad[3:]).max() > 0


def test_k3_is_nonnegative_zero_on_policy_and_k1_k2_match_their_formulas():
    rng = np.random.default_rng(3)
    logp, ref = -rng.uniform(0, 2, (2, 1000)), -rng.uniform(0, 2, (2, 1000))
    k3 = kl_divergence(logp, ref, "k3")
    np.testing.assert_allclose(k3, np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-5, atol=1e-6)
    assert (k3 >= 0).all()
    np.testing.assert_array_equal(kl_divergence(logp, logp, "k3"), 0)
    near = jnp.asarray(rng.normal(0, 1e-4, 10_000), jnp.float32)  # float32, near r = 1
    assert (kl_divergence(near, jnp.zeros_like(near), "k3") >= 0).all()
    np.testing.assert_allclose(kl_divergence(logp, ref, "k1"), logp - ref, rtol=1e-6)
    np.testing.assert_allclose(kl_divergence(logp, ref, "k2"), 0.5 * (logp - ref) ** 2, rtol=1e-5)
    # verl's clamps: log-ratio to +-20, k3 to 10, so a vanishing log-prob stays finite.
    assert kl_divergence(jnp.array([-1e4]), jnp.array([0.0]), "k3") == 10.0


def test_overlong_penalty_follows_dapo():
    lengths = np.array([0, 12, 13, 14, 16, 17, 40])
    want = [0, 0, -1 / 4, -2 / 4, -1, -1, -1]  # L_max 16, L_cache 4: the ramp starts past 12
    np.testing.assert_allclose(overlong_penalty(lengths, 16, 4), want, rtol=1e-6)


def test_grpo_config_parses_overrides_and_names_bad_fields():
    config = apply_overrides(Config(), ["grpo.loss_type=gspo", "grpo.beta=0.04"])
    assert config.grpo == dataclasses.replace(GRPOConfig(), loss_type="gspo", beta=0.04)
    for override, field in [
        ("grpo.epsilon_low=1.5", "grpo.epsilon_low"),
        ("grpo.group_size=1", "grpo.group_size"),
        ("grpo.overlong_buffer=100", "grpo.overlong_buffer"),
        ("grpo.loss_type=ppo", "grpo.loss_type"),
    ]:
        with pytest.raises(ConfigError, match=field):
            apply_overrides(Config(), [override])
