"""The jit GRPO update step: sharding invariance, learning direction, MoE bias updates."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_model
from jaxllm import Config, MeshConfig, MoEConfig, parallel
from jaxllm.config import GRPOConfig
from jaxllm.nn import Transformer
from jaxllm.rl.loss import grpo_loss
from jaxllm.rl.step import batch_keys, jit_grpo_step, jit_logprobs, token_logprobs
from jaxllm.train.state import TrainState, _create

B, S, PROMPT = 8, 16, 6
LEARNING_RATE = 0.5
SEQUENCES = ("tokens", "positions", "segment_ids")


def sequences(seed: int = 0) -> dict:
    """Random token rows whose tokens from PROMPT on (fewer for some rows) are the completion,
    with advantages +1, -1, +1, ..."""
    rng = np.random.default_rng(seed)
    ends = np.array([S, S, S - 3, S, S - 5, S, S - 1, S])
    t = np.arange(S)
    return {
        "tokens": rng.integers(0, 384, (B, S)).astype(np.int32),
        "positions": np.broadcast_to(t, (B, S)).astype(np.int32),
        "segment_ids": np.ones((B, S), np.int32),
        "completion_mask": ((t >= PROMPT) & (t < ends[:, None])).astype(np.float32),
        "advantages": np.array([1, -1] * (B // 2), np.float32),
        "sampler_logprobs": np.zeros((B, S), np.float32),
    }


def random_state(model, mesh_config: MeshConfig, devices=None, seed: int = 0):
    """(mesh, tx, state, state shardings): random-normal params drawn on the host and laid
    out on the mesh, so that no init is compiled."""
    mesh = parallel.make_mesh(Config(mesh=mesh_config), devices=devices)
    tx = optax.sgd(LEARNING_RATE)
    create = functools.partial(_create, model=model, tx=tx, seq_len=S)
    with parallel.use_mesh(mesh):
        boxed = jax.eval_shape(create, jax.random.key(0))
    shardings = parallel.shardings(boxed, mesh)
    shapes = nn.meta.unbox(boxed)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(x.dtype), shapes.params)
    moe_bias = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes.moe_bias)
    state = TrainState(np.zeros((), np.int32), params, tx.init(params), jax.random.key(seed),
                       moe_bias)
    return mesh, tx, jax.device_put(state, shardings), shardings


def step_once(model, cfg, mesh, tx, state, shardings, batch):
    with parallel.use_mesh(mesh):
        schedule = optax.constant_schedule(LEARNING_RATE)
        step = jit_grpo_step(model, tx, cfg, schedule, mesh, shardings)
        state, metrics = step(state, {k: batch[k] for k in batch_keys(cfg)})
    return state, jax.device_get(metrics)


CFG = GRPOConfig(beta=0.04, loss_type="dapo")  # mu = 1: pi_old is the step's own policy


@pytest.fixture(scope="module")
def runs():
    """One GRPO step with a KL term, from the same start and batch, on data=8 and on
    fsdp=4 x tensor=2; and on data=8 the log-probs before and after."""
    model = Transformer(tiny_model())
    batch = sequences()
    mesh, tx, state, shardings = random_state(model, MeshConfig(data=8))
    start = jax.device_get(state)
    with parallel.use_mesh(mesh):
        logprobs = jit_logprobs(model, mesh, shardings)
        before = np.asarray(logprobs(state.params, state.moe_bias, *(batch[k] for k in SEQUENCES)))
    noise = np.random.default_rng(1).normal(0, 0.3, (B, S))
    batch["ref_logprobs"] = (before + noise).astype(np.float32)
    batch["sampler_logprobs"] = before  # on-policy sampling: importance weights 1
    data8, metrics8 = step_once(model, CFG, mesh, tx, state, shardings, batch)
    with parallel.use_mesh(mesh):
        after = logprobs(data8.params, data8.moe_bias, *(batch[k] for k in SEQUENCES))
    mesh2, tx, state2, shardings2 = random_state(model, MeshConfig(data=1, fsdp=4, tensor=2))
    split, metrics2 = step_once(model, CFG, mesh2, tx, state2, shardings2, batch)
    return dict(
        batch=batch, start=start, before=before, after=np.asarray(after),
        data8=(jax.device_get(data8), metrics8), split=(jax.device_get(split), metrics2),
    )


def test_token_logprobs_match_a_per_position_log_softmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(0, 2, (2, 5, 7)), jnp.bfloat16)
    tokens = np.array([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]])
    logp, entropy = jax.jit(token_logprobs)(logits, jnp.asarray(tokens))
    x = np.asarray(logits, np.float64)
    table = x - np.log(np.exp(x).sum(-1, keepdims=True))  # log-softmax, in float64
    want = np.zeros((2, 5))
    want_entropy = np.zeros((2, 5))
    for b in range(2):
        for t in range(1, 5):  # position t holds the prediction of token t, made at t - 1
            want[b, t] = table[b, t - 1, tokens[b, t]]
            want_entropy[b, t] = -(np.exp(table[b, t - 1]) * table[b, t - 1]).sum()
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5, atol=1e-6)


def test_update_is_sharding_invariant(runs):
    (want, want_metrics), (got, got_metrics) = runs["data8"], runs["split"]
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), want.params, runs["start"].params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the update is large next to the tolerance
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        got.params, want.params,
    )
    for name in ("loss", "kl", "entropy", "grad_norm"):
        np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=1e-5, err_msg=name)


def test_on_policy_step_has_unit_ratio_and_follows_the_advantages(runs):
    """mu = 1: the ratio is exactly 1 and the step's loss is `grpo_loss` on `jit_logprobs`'
    log-probs; one step moves each completion's log-prob in the direction of its advantage."""
    batch, before, after = runs["batch"], runs["before"], runs["after"]
    _, metrics = runs["data8"]
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_fraction"] == 0.0
    want, want_metrics = jax.jit(grpo_loss, static_argnums=4)(
        before, before, batch["advantages"], batch["completion_mask"], CFG, batch["ref_logprobs"]
    )
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], want_metrics["kl"], rtol=1e-5)
    change = ((after - before) * batch["completion_mask"]).sum(1)
    np.testing.assert_array_less(0, change[batch["advantages"] > 0])
    np.testing.assert_array_less(change[batch["advantages"] < 0], 0)


def test_moe_selection_biases_take_their_aux_loss_free_step():
    """As in pretraining: b += rate * sign(mean load - load), with the loads the step
    reports (B * S * k = 256 assignments, so the load fractions are exact)."""
    rate, experts = 0.01, 4
    moe_config = MoEConfig(num_experts=experts, experts_per_token=2, expert_dim=16,
                           router="sigmoid", bias_update_rate=rate)
    model = Transformer(tiny_model(num_layers=1, moe=moe_config))
    mesh, tx, state, shardings = random_state(model, MeshConfig(data=1), jax.devices()[:1])
    (start,) = jax.tree.leaves(jax.device_get(state.moe_bias))  # [1 layer, experts]
    after, metrics = step_once(model, GRPOConfig(), mesh, tx, state, shardings, sequences(2))
    loads = np.array([metrics[f"moe/layer_0/load_fraction_{e}"] for e in range(experts)])
    assert loads.min() < loads.max()  # unbalanced loads: the update is not zero
    (got,) = jax.tree.leaves(jax.device_get(after.moe_bias))
    np.testing.assert_array_equal(got[0], start[0] + rate * np.sign(loads.mean() - loads))


def test_batch_keys_follow_the_config():
    assert batch_keys(GRPOConfig()) == SEQUENCES + (
        "completion_mask", "advantages", "sampler_logprobs"
    )
    assert batch_keys(GRPOConfig(num_iterations=2, beta=0.1))[-2:] == (
        "old_logprobs", "ref_logprobs"
    )
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2)),
                  GRPOConfig(beta=0.04))
