"""Off-policy correction: importance weights by hand, sampler-vs-trainer agreement in float32
and mismatch in bfloat16, the weighted loss, and the metrics a GRPO run logs."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

from helpers import init_params, tiny_model
from jaxllm import config as config_lib
from jaxllm.config import GRPOConfig
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.nn import Transformer
from jaxllm.rl.importance import MODES, importance_weights
from jaxllm.rl.loop import grpo
from jaxllm.rl.loss import grpo_loss
from jaxllm.rl.rollout import rollout, rollout_sampler
from jaxllm.rl.step import logprobs
from test_rl_loop import PROBLEMS, letters, toy_config

CAP = 3.0
# Two rows of 5 columns, the completion on columns 2-4, and row 1's last token masked off
# (dropped): its huge ratio must not count. Ratios r = pi_old / pi_sampler per token.
MASK = np.array([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]], np.float32)
RATIOS = np.array([[7.0, 0.1, 2.0, 0.5, 4.0], [9.0, 5.0, 1.5, 1.2, 1e4]])
# Products over the completion: row 0: 2 * 0.5 * 4 = 4 > C; row 1: 1.5 * 1.2 = 1.8.
WANT = {
    "none": [[1, 1, 1], [1, 1]],
    "token_truncate": [[2.0, 0.5, 3.0], [1.5, 1.2]],
    "token_mask": [[2.0, 0.5, 0.0], [1.5, 1.2]],
    "sequence_truncate": [[3.0, 3.0, 3.0], [1.8, 1.8]],
    "sequence_mask": [[0.0, 0.0, 0.0], [1.8, 1.8]],
}
CAPPED = {"none": 1 / 5, "token_truncate": 1 / 5, "token_mask": 1 / 5,
          "sequence_truncate": 1 / 2, "sequence_mask": 1 / 2}


def hand_case():
    sampler = np.random.default_rng(0).uniform(-3, -0.1, MASK.shape).astype(np.float32)
    return (sampler + np.log(RATIOS)).astype(np.float32), sampler


@pytest.mark.parametrize("mode", MODES)
def test_weights_and_metrics_equal_a_hand_computation(mode):
    old, sampler = hand_case()
    weights, metrics = jax.jit(functools.partial(importance_weights, mode=mode, cap=CAP))(
        old, sampler, MASK)
    got = [np.asarray(weights)[0, 2:], np.asarray(weights)[1, 2:4]]
    for row, want in zip(got, WANT[mode]):
        np.testing.assert_allclose(row, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["offpolicy/weight_mean"],
                               np.concatenate(WANT[mode]).mean(), rtol=1e-5)
    assert metrics["offpolicy/capped_fraction"] == pytest.approx(CAPPED[mode])
    r = np.array([2.0, 0.5, 4.0, 1.5, 1.2])  # the completion tokens' ratios
    np.testing.assert_allclose(metrics["offpolicy/kl"], (r - 1 - np.log(r)).mean(), rtol=1e-5)


def test_the_policy_loss_of_each_token_is_multiplied_by_its_weight():
    """On policy (ratio 1) the dapo loss is -sum(A w) over completion tokens / their count."""
    old, sampler = hand_case()
    weights, _ = importance_weights(old, sampler, MASK, mode="token_truncate", cap=CAP)
    advantages = np.array([1.0, -2.0], np.float32)
    loss, _ = grpo_loss(old, old, advantages, MASK, GRPOConfig(loss_type="dapo"),
                        weights=weights)
    want = -(advantages[0] * (2.0 + 0.5 + 3.0) + advantages[1] * (1.5 + 1.2)) / 5
    np.testing.assert_allclose(loss, want, rtol=1e-5)


@functools.cache
def sampled(dtype: str):
    """A tiny model's rollout sampled in `dtype`, and the trainer's float32 log-probs of it."""
    tokenizer = ByteTokenizer()
    model = Transformer(tiny_model(vocab_size=tokenizer.vocab_size, embed_dim=32, mlp_dim=64))
    params = init_params(model)
    sampler = rollout_sampler(model, params, tokenizer, dtype=dtype)
    ro = rollout(sampler, PROBLEMS[:2], group_size=2, max_new_tokens=12, temperature=1.0,
                 rng=jax.random.key(3))
    trainer = jax.jit(functools.partial(logprobs, model=model))(
        params, {}, ro.tokens, ro.positions, ro.segment_ids)
    return ro, np.asarray(trainer)


@pytest.mark.parametrize("mode", MODES[1:])
def test_float32_rollouts_have_unit_weights(mode):
    ro, trainer = sampled("float32")
    mask = ro.completion_mask.astype(np.float32)
    assert mask.sum() >= 8
    weights, metrics = importance_weights(trainer, ro.sampler_logprobs, mask, mode=mode, cap=CAP)
    np.testing.assert_allclose(np.asarray(weights)[mask > 0], 1.0, atol=1e-5)
    assert abs(float(metrics["offpolicy/kl"])) < 1e-5
    assert metrics["offpolicy/capped_fraction"] == 0


def test_bfloat16_rollouts_are_corrected_and_their_kl_is_positive():
    ro, trainer = sampled("bfloat16")
    mask = ro.completion_mask.astype(np.float32)
    weights, metrics = importance_weights(trainer, ro.sampler_logprobs, mask,
                                          mode="token_truncate", cap=CAP)
    gap = np.abs(np.asarray(weights) - 1)[mask > 0]
    assert gap.max() > 1e-3
    np.testing.assert_allclose(np.asarray(weights)[mask > 0],
                               np.minimum(np.exp((trainer - ro.sampler_logprobs)[mask > 0]), CAP),
                               rtol=1e-5)
    assert metrics["offpolicy/kl"] > 0


@pytest.mark.slow
def test_a_grpo_run_logs_the_off_policy_metrics(tmp_path):
    config = toy_config(tmp_path, 2)
    config = dataclasses.replace(config, grpo=dataclasses.replace(
        config.grpo, rollout_dtype="bfloat16", importance_sampling="sequence_mask"))
    lines = []
    history = grpo(config, log=lines.append, reward_fns=[letters], problems=PROBLEMS)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in logged] == [1, 2]
    for record in history + logged:
        assert record["offpolicy/kl"] > 0
        assert 0 < record["offpolicy/weight_mean"] <= CAP
        assert 0 <= record["offpolicy/capped_fraction"] <= 1
    assert sum("sampler kl" in line for line in lines) == 2


@pytest.mark.parametrize("field, value", [
    ("rollout_dtype", "float16"),
    ("importance_sampling", "tis"),
    ("importance_sampling_cap", 0.5),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(config_lib.ConfigError, match=f"grpo.{field}"):
        GRPOConfig(**{field: value}).validate("grpo.")
