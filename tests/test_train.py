"""The train step and loop: accumulation, loss, optimizer masking, and learning."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import arithmetic_batch, tiny_model
from jaxllm import Config, MeshConfig, TrainConfig, parallel, presets
from jaxllm.nn import Transformer
from jaxllm.train.loop import pretrain
from jaxllm.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from jaxllm.train.flops import train_flops_per_token
from jaxllm.train.state import count_params, init_state
from jaxllm.train.step import cross_entropy, jit_train_step


def one_step(grad_accum: int, mesh_config: MeshConfig):
    cfg = TrainConfig(
        batch_size=8, seq_len=32, grad_accum=grad_accum, z_loss=1e-3, steps=10, warmup_steps=1
    )
    config = Config(model=tiny_model(), mesh=mesh_config, train=cfg)
    mesh = parallel.make_mesh(config)
    model, tx = Transformer(config.model), make_optimizer(cfg)
    state, shardings = init_state(model, tx, cfg.seq_len, mesh, jax.random.key(0))
    batch = jax.device_put(arithmetic_batch(8, 32), parallel.batch_sharding(mesh))
    with parallel.use_mesh(mesh):
        step = jit_train_step(model, tx, cfg, learning_rate_schedule(cfg), mesh, shardings)
        state, _ = step(state, batch)  # warmup step: learning rate 0
        state, metrics = step(state, batch)
    return jax.device_get(state.params), jax.device_get(metrics)


def test_gradient_accumulation_equals_one_big_batch():
    mesh = MeshConfig(data=1, fsdp=2, tensor=4)
    want_params, want = one_step(1, mesh)
    got_params, got = one_step(4, mesh)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)
    # Adam's first update is about lr * sign(g) = 3e-3 per weight; agree to within 3% of it
    # (g / sqrt(v) turns float noise in a near-zero gradient into a visible difference).
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got_params, want_params
    )


def test_cross_entropy_matches_optax_with_mask_and_z_loss():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 3
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], jnp.float32)
    nll, z_term, tokens = cross_entropy(logits.astype(jnp.bfloat16), targets, mask, z_loss=1e-2)
    want = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.bfloat16).astype(jnp.float32), targets
    )
    log_z = jax.nn.logsumexp(logits.astype(jnp.bfloat16).astype(jnp.float32), -1)
    np.testing.assert_allclose(nll, (want * mask).sum(), rtol=1e-5)
    np.testing.assert_allclose(z_term, 1e-2 * (log_z**2 * mask).sum(), rtol=1e-5)
    assert tokens == 7


def test_weight_decay_skips_norm_scales():
    params = {"attn_norm": {"scale": 1.0}, "mlp": {"wi": {"kernel": 1.0}}, "embedding": 1.0}
    assert decay_mask(params) == {
        "attn_norm": {"scale": False},
        "mlp": {"wi": {"kernel": True}},
        "embedding": True,
    }


@pytest.mark.parametrize("grad_clip, scale", [(0.0, 1.0), (0.5, 0.1), (50.0, 1.0)])
def test_the_optimizer_clips_the_global_norm_and_zero_turns_clipping_off(grad_clip, scale):
    """The updates equal AdamW's on the gradients scaled to norm min(|g|, grad_clip); a
    large eps makes Adam's update depend on the gradient's scale."""
    cfg = TrainConfig(steps=10, warmup_steps=0, learning_rate=1e-2, grad_clip=grad_clip,
                      eps=1.0)
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([3.0, 0.0, 4.0])}  # global norm 5
    tx = make_optimizer(cfg)
    reference = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                            weight_decay=cfg.weight_decay, mask=decay_mask)
    state, ref_state = tx.init(params), reference.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        expected, ref_state = reference.update(jax.tree.map(lambda g: g * scale, grads),
                                               ref_state, params)
        np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-5)
        assert np.abs(updates["w"]).max() > 0


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
    schedule = learning_rate_schedule(cfg)
    assert schedule(0) == 0.0
    np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(schedule(100), 1e-4, rtol=1e-5)


@pytest.mark.slow
def test_training_the_tiny_model_lowers_the_loss(tmp_path):
    config = Config(
        model=presets.tiny_dense(),
        mesh=MeshConfig(data=2, fsdp=2, tensor=2),
        train=TrainConfig(steps=100, batch_size=16, seq_len=64, log_every=25, peak_flops=1e12),
        workdir=str(tmp_path),
    )
    history = pretrain(config, log=lambda line: None)
    first, last = history[0]["loss"], history[-1]["loss"]
    assert last < 0.4 * first, (first, last)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in logged if "loss" in m]
    assert [m["step"] for m in trained] == [1, 25, 50, 75, 100]
    params = jax.eval_shape(Transformer(config.model).init, jax.random.key(0),
                            jnp.zeros((1, 64), jnp.int32))["params"]
    per_token = train_flops_per_token(config.model, count_params(params), 64)
    for m in trained:  # MFU against the given peak (the measured one moves with the load)
        assert m["tokens_per_s"] > 0
        assert m["mfu"] == pytest.approx(m["tokens_per_s"] * per_token / (1e12 * 8), rel=1e-6)
    evaluated = [m for m in logged if "eval_loss" in m]
    assert [m["step"] for m in evaluated] == [50, 100]
    assert evaluated[-1]["eval_loss"] < evaluated[0]["eval_loss"]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 100
    assert list((tmp_path / "tb").iterdir()), "no TensorBoard events"
