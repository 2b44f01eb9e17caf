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
from jaxllm.config import AttentionConfig, GRPOConfig
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.nn import Transformer
from jaxllm.rl.importance import MODES, importance_weights, off_policy_sequence_mask
from jaxllm.rl.loop import grpo
from jaxllm.rl.loss import grpo_loss
from jaxllm.rl.rollout import rollout, rollout_sampler
from jaxllm.rl.step import jit_logprobs, logprobs
from test_loop import tensorboard_scalars
from test_rl_loop import PROBLEMS, letters, toy_config
from test_rl_step import SEQUENCES, random_state, sequences, step_once

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


def test_off_policy_sequence_masking_drops_negative_far_off_sequences():
    """Rows: negative advantage and mean log(pi_s / pi_theta) 0.8 > delta: dropped; the same
    at 0.2: kept; positive advantage at 0.8: kept; no completion tokens: kept, not counted."""
    mask = np.array([[0, 1, 1], [0, 1, 1], [0, 1, 1], [0, 0, 0]], np.float32)
    logp = np.full((4, 3), -1.0, np.float32)
    gaps = np.array([[5.0, 0.6, 1.0], [5.0, 0.1, 0.3], [5.0, 1.0, 0.6], [5.0, 5.0, 5.0]])
    keep, metrics = off_policy_sequence_mask(logp, logp + gaps, np.array([-1.0, -1.0, 1.0, -1.0]),
                                             mask, threshold=0.5)
    np.testing.assert_array_equal(np.asarray(keep)[:, 0], [0, 1, 1, 1])
    assert metrics["offpolicy/masked_sequences"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_the_update_weights_its_loss_by_pi_old_over_the_sampler(num_iterations):
    """The jitted step's loss is `grpo_loss` with token_mask weights computed by hand from
    pi_old (the step's own log-probs, or old_logprobs when mu > 1) and the sampler's, times
    the off-policy sequence mask computed from pi_theta and the sampler's."""
    threshold = 0.5
    cfg = GRPOConfig(loss_type="dapo", importance_sampling="token_mask",
                     num_iterations=num_iterations, off_policy_mask_threshold=threshold)
    model = Transformer(tiny_model(num_layers=1))
    mesh, tx, state, shardings = random_state(model, config_lib.MeshConfig(data=1),
                                              jax.devices()[:1])
    batch = sequences()
    current = np.asarray(jit_logprobs(model, mesh, shardings)(
        state.params, state.moe_bias, *(batch[k] for k in SEQUENCES)))
    rng = np.random.default_rng(2)
    old = current + (rng.normal(0, 0.05, current.shape) if num_iterations > 1 else 0)
    # The first half of the rows are far off: the sampler favoured their tokens 10 times more.
    far = np.where(np.arange(len(old)) < len(old) // 2, 0.1, 1.0)[:, None]
    ratios = rng.uniform(0.2, 5.0, current.shape) * far
    batch["old_logprobs"] = old.astype(np.float32)
    batch["sampler_logprobs"] = (old - np.log(ratios)).astype(np.float32)
    _, metrics = step_once(model, cfg, mesh, tx, state, shardings, batch)
    mask, advantages = batch["completion_mask"], batch["advantages"]
    divergence = ((batch["sampler_logprobs"] - current) * mask).sum(1) / mask.sum(1)
    keep = ~((advantages < 0) & (divergence > threshold))
    assert 0 < keep.sum() < len(keep)
    weights = np.where(ratios > CAP, 0.0, ratios) * keep[:, None]
    want, _ = grpo_loss(current, old, advantages, mask, cfg, weights=weights)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-4)
    np.testing.assert_allclose(metrics["offpolicy/weight_mean"],
                               (np.where(ratios > CAP, 0.0, ratios) * mask).sum() / mask.sum(),
                               rtol=1e-4)
    np.testing.assert_allclose(metrics["offpolicy/masked_sequences"], 1 - keep.mean())


@functools.cache
def sampled(dtype: str, temperature: float = 1.0, attention: AttentionConfig = AttentionConfig()):
    """A tiny model's rollout sampled in `dtype` at `temperature`, the trainer's float32
    log-probs of it at that temperature, and the model's float32 logits of it."""
    tokenizer = ByteTokenizer()
    model = Transformer(tiny_model(vocab_size=tokenizer.vocab_size, embed_dim=32, mlp_dim=64,
                                   attention=attention))
    params = init_params(model)
    sampler = rollout_sampler(model, params, tokenizer, dtype=dtype)
    ro = rollout(sampler, [PROBLEMS[3], PROBLEMS[12]], group_size=2, max_new_tokens=12,
                 temperature=temperature, rng=jax.random.key(3))
    trainer = jax.jit(functools.partial(logprobs, model=model, temperature=temperature))(
        params, {}, ro.tokens, ro.positions, ro.segment_ids)
    logits = model.apply({"params": params}, ro.tokens, ro.positions, ro.segment_ids)
    return ro, np.asarray(trainer), np.asarray(logits)


@pytest.mark.parametrize("mode", MODES[1:])
@pytest.mark.parametrize("attention", [
    AttentionConfig(),
    AttentionConfig(pattern="chunked", chunk=3),  # masks that look at a token's row index
    AttentionConfig(pattern="strided", window=2, stride=3),
], ids=["global", "chunked", "strided"])
def test_float32_rollouts_have_unit_weights(mode, attention):
    """The trainer's forward over the rollout's rows (prompts of different lengths) sees
    what the sampler's cache saw."""
    ro, trainer, _ = sampled("float32", attention=attention)
    assert len({len(prompt) for prompt in ro.prompts}) > 1
    mask = ro.completion_mask.astype(np.float32)
    assert mask.sum() >= 8
    weights, metrics = importance_weights(trainer, ro.sampler_logprobs, mask, mode=mode, cap=CAP)
    np.testing.assert_allclose(np.asarray(weights)[mask > 0], 1.0, atol=1e-5)
    assert abs(float(metrics["offpolicy/kl"])) < 1e-5
    assert metrics["offpolicy/capped_fraction"] == 0


def test_sampler_and_trainer_log_probs_are_of_the_temperature_scaled_policy():
    """At T = 0.5 both sides give log softmax(z / T) of the sampled tokens, so a float32
    rollout still has unit weights; at T = 1 they would differ by up to nats."""
    ro, trainer, logits = sampled("float32", 0.5)
    mask = ro.completion_mask > 0
    scaled = jax.nn.log_softmax(logits[:, :-1] / 0.5, axis=-1)
    want = np.take_along_axis(np.asarray(scaled), ro.tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(trainer[:, 1:][mask[:, 1:]], want[mask[:, 1:]], atol=1e-5)
    np.testing.assert_allclose(ro.sampler_logprobs[mask], trainer[mask], atol=1e-5)
    unscaled = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1))
    at_one = np.take_along_axis(unscaled, ro.tokens[:, 1:, None], axis=-1)[..., 0]
    assert np.abs(at_one - want)[mask[:, 1:]].max() > 0.1


def test_bfloat16_rollouts_are_corrected_and_their_kl_is_positive():
    ro, trainer, _ = sampled("bfloat16")
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
        config.grpo, rollout_dtype="bfloat16", importance_sampling="sequence_mask",
        off_policy_mask_threshold=0.5))
    lines = []
    history = grpo(config, log=lines.append, reward_fns=[letters], problems=PROBLEMS)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in logged] == [1, 2]
    for record in history + logged:
        assert record["offpolicy/kl"] > 0
        assert 0 < record["offpolicy/weight_mean"] <= CAP
        assert 0 <= record["offpolicy/capped_fraction"] <= 1
        assert 0 <= record["offpolicy/masked_sequences"] <= 1
    tensorboard = tensorboard_scalars(tmp_path / "tb")
    for key in ("offpolicy/kl", "offpolicy/weight_mean", "offpolicy/capped_fraction"):
        assert tensorboard[key] == {r["step"]: pytest.approx(r[key], rel=1e-6) for r in logged}
    assert sum("sampler kl" in line for line in lines) == 2


@pytest.mark.parametrize("field, value", [
    ("rollout_dtype", "float16"),
    ("importance_sampling", "tis"),
    ("importance_sampling_cap", 0.5),
    ("off_policy_mask_threshold", 0.0),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(config_lib.ConfigError, match=f"grpo.{field}"):
        GRPOConfig(**{field: value}).validate("grpo.")
