"""Expert parallelism (all_to_all inside shard_map) against the single-device MoE."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import arithmetic_batch, tiny_model
from jaxllm import Config, ConfigError, MeshConfig, MoEConfig, TrainConfig, parallel
from jaxllm.nn import Transformer
from jaxllm.nn.moe import MoE
from jaxllm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxllm.train.state import init_state
from jaxllm.train.step import jit_train_step
from test_moe import init_moe

DEEPSEEK_LIKE = MoEConfig(
    num_experts=8, experts_per_token=3, expert_dim=16, router="sigmoid", n_group=4, topk_group=2,
    routed_scaling_factor=2.5, num_shared_experts=1, shared_expert_dim=8,
)
MESHES = {
    "expert4": (MeshConfig(data=1, expert=4), 4),
    "expert8": (MeshConfig(data=1, expert=8), 8),
    "data2_expert4": (MeshConfig(data=2, expert=4), 8),
}


def make_mesh(mesh_config: MeshConfig, devices: int):
    return parallel.make_mesh(Config(mesh=mesh_config), devices=jax.devices()[:devices])


def moe_grads(cfg, variables, x, cotangent, mesh=None):
    """(output, loss, (param grads, input grads), moe_metrics, compiled HLO text)."""

    def loss(params, x):
        y, sown = MoE(cfg).apply({**variables, "params": params}, x, mutable=["moe_metrics"])
        return jnp.sum(y * cotangent), (y, sown["moe_metrics"])

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if mesh is None:
        (value, (y, metrics)), grads = fn(variables["params"], x)
        return y, value, grads, metrics, ""
    with parallel.use_mesh(mesh):
        compiled = fn.lower(variables["params"], x).compile()
        (value, (y, metrics)), grads = compiled(variables["params"], x)
    return y, value, grads, metrics, compiled.as_text()


@pytest.mark.parametrize("kernel", ["ragged_dot", "tiled"])  # the kernels agree: test_moe
@pytest.mark.parametrize("mesh_name", MESHES)
def test_expert_parallel_moe_matches_one_device(mesh_name, kernel):
    cfg = dataclasses.replace(DEEPSEEK_LIKE, kernel=kernel)
    x = jax.random.normal(jax.random.key(0), (4, 8, 16))
    cotangent = jax.random.normal(jax.random.key(3), x.shape)
    variables = init_moe(cfg, x, bias_seed=2)
    want_y, want_loss, want_grads, want_metrics, _ = moe_grads(cfg, variables, x, cotangent)
    mesh = make_mesh(*MESHES[mesh_name])
    y, loss, grads, metrics, hlo = moe_grads(cfg, variables, x, cotangent, mesh)
    assert "all-to-all" in hlo
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads, want_grads
    )
    assert float(metrics["dropped_fraction"]) == 0.0
    np.testing.assert_array_equal(metrics["tokens_per_expert"], want_metrics["tokens_per_expert"])


def test_capacity_drops_the_choices_past_each_pairs_slots():
    """Four shards of 8 tokens, top-2 of 8 experts (2 per shard): C = ceil(0.5 * 16 / 4) = 2
    slots per (source, destination) pair. Tokens whose choices all fit are unchanged."""
    cfg = MoEConfig(num_experts=8, experts_per_token=2, expert_dim=16, dispatch="capacity",
                    capacity_factor=0.5)
    dropless = dataclasses.replace(cfg, dispatch="dropless")
    x = jax.random.normal(jax.random.key(0), (4, 8, 16))
    variables = init_moe(cfg, x)
    apply = jax.jit(lambda v, x: MoE(cfg).apply(v, x, mutable=["moe_metrics"]))
    with parallel.use_mesh(make_mesh(MeshConfig(data=1, expert=4), 4)):
        y, sown = apply(variables, x)
    want_y = jax.jit(MoE(dropless).apply)(variables, x).reshape(32, 16)

    logits = x.reshape(32, 16) @ variables["params"]["router"]["kernel"]
    experts = np.asarray(jax.lax.top_k(logits, 2)[1])  # [T, K]
    dropped = np.zeros((32, 2), bool)
    for shard in range(4):
        rows = slice(8 * shard, 8 * shard + 8)
        dest = experts[rows].T // 2  # [K, t], choice-major like the dispatch
        for d in range(4):
            k_idx, t_idx = np.nonzero(dest == d)
            dropped[8 * shard + t_idx[2:], k_idx[2:]] = True
    assert dropped.any()
    np.testing.assert_allclose(sown["moe_metrics"]["dropped_fraction"], dropped.mean(), rtol=1e-6)
    intact = ~dropped.any(-1)
    np.testing.assert_allclose(y.reshape(32, 16)[intact], want_y[intact], rtol=1e-5, atol=1e-5)


def train_step(cfg, mesh_config: MeshConfig, devices: int):
    """One train step on `devices` devices: (state, metrics, compiled HLO text)."""
    train = TrainConfig(batch_size=8, seq_len=32, steps=10, warmup_steps=1)
    config = Config(model=cfg, mesh=mesh_config, train=train)
    mesh = parallel.make_mesh(config, devices=jax.devices()[:devices])
    model, tx = Transformer(cfg), make_optimizer(train)
    state, shardings = init_state(model, tx, train.seq_len, mesh, jax.random.key(0))
    batch = jax.device_put(arithmetic_batch(8, 32), parallel.batch_sharding(mesh))
    with parallel.use_mesh(mesh):
        step = jit_train_step(model, tx, train, learning_rate_schedule(train), mesh, shardings)
        compiled = step.lower(state, batch).compile()  # run what we inspect: one compile
        state, metrics = compiled(state, batch)
    return jax.device_get(state), jax.device_get(metrics), compiled.as_text()


TRAIN_MODEL = tiny_model(num_layers=2, remat="full", moe=dataclasses.replace(
    DEEPSEEK_LIKE, load_balance_loss=1e-2, bias_update_rate=0.01
))


@pytest.mark.slow
def test_expert_parallel_train_steps_match_one_device():
    """data x expert, and fsdp x expert x tensor, each against one device."""
    want, want_metrics, _ = train_step(TRAIN_MODEL, MeshConfig(data=1), 1)
    for mesh_config in (MeshConfig(data=2, expert=4),
                        MeshConfig(data=1, fsdp=2, expert=2, tensor=2)):
        got, metrics, hlo = train_step(TRAIN_MODEL, mesh_config, 8)
        assert "all-to-all" in hlo
        np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-5)
        assert metrics["moe/layer_0/dropped_fraction"] == 0.0
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5),
                     (got.params, got.moe_bias), (want.params, want.moe_bias))


def test_experts_must_divide_over_the_expert_axis():
    config = Config(model=tiny_model(moe=MoEConfig(num_experts=6)), mesh=MeshConfig(expert=4))
    with pytest.raises(ConfigError, match="^model.moe.num_experts"):
        parallel.make_mesh(config, devices=jax.devices()[:4])
    off = dataclasses.replace(config.model.moe, expert_parallel=False)
    gspmd = dataclasses.replace(config, model=dataclasses.replace(config.model, moe=off))
    assert parallel.make_mesh(gspmd, devices=jax.devices()[:4]).shape["expert"] == 4
