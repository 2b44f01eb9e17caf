"""MoE layers in the decoder and the train step: layer patterns, scan, aux losses, biases."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import abstract_params, arithmetic_batch, dense_loss_sums, tiny_model
from jaxllm import Config, MeshConfig, MoEConfig, TrainConfig, parallel, presets
from jaxllm import config as config_lib
from jaxllm.config import LoRAConfig
from jaxllm.nn import Transformer, router
from jaxllm.nn.transformer import layer_number
from jaxllm.train.flops import matmul_params
from jaxllm.train.loop import pretrain
from jaxllm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxllm.train.state import count_params, init_state
from jaxllm.train.step import jit_train_step

DEEPSEEK_LIKE = MoEConfig(
    num_experts=8, experts_per_token=2, expert_dim=32, num_shared_experts=1, router="sigmoid",
    n_group=2, topk_group=1, routed_scaling_factor=2.5, seq_aux_loss=1e-3, load_balance_loss=1e-2,
    router_z_loss=1e-3, bias_update_rate=0.01, first_dense_layers=1, moe_every=2,
)


def init_variables(model, seed=0):
    tokens = jnp.zeros((1, 16), jnp.int32)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), tokens))
    variables.pop("moe_metrics", None)
    return variables


def test_layer_pattern_puts_moe_after_the_dense_layers_every_nth_layer():
    cfg = tiny_model(num_layers=5, moe=DEEPSEEK_LIKE)
    assert cfg.moe_layers() == (False, False, True, False, True)
    variables = init_variables(Transformer(cfg))
    decoder = variables["params"]["decoder"]
    assert set(decoder) == {"dense_layers", "layers"}
    assert decoder["dense_layers"]["mlp"]["wi"]["kernel"].shape == (1, 64, 2, 128)
    assert decoder["layers"]["block_1"]["moe"]["wi"].shape == (2, 8, 64, 2, 32)
    assert "mlp" in decoder["layers"]["block_0"] and "moe" not in decoder["layers"]["block_0"]
    bias = variables["moe_bias"]["decoder"]["layers"]["block_1"]["moe"]["e_score_correction_bias"]
    assert bias.shape == (2, 8)
    assert [layer_number(cfg, ("layers", "block_1"), i) for i in range(2)] == [2, 4]


def unroll(cfg, tree):
    """A scanned decoder collection -> the unrolled layout layers_0 ... layers_{L-1}."""
    unrolled = {}
    for segment, stacked in tree["decoder"].items():
        groups = stacked if any(k.startswith("block_") for k in stacked) else {None: stacked}
        for block, leaves in groups.items():
            path = (segment,) if block is None else (segment, block)
            repeats = jax.tree.leaves(leaves)[0].shape[0]
            for i in range(repeats):
                name = f"layers_{layer_number(cfg, path, i)}"
                unrolled[name] = jax.tree.map(lambda x: x[i], leaves)
    return {**tree, "decoder": unrolled}


def test_scanned_and_unrolled_moe_stacks_are_identical():
    cfg = tiny_model(num_layers=5, moe=DEEPSEEK_LIKE)
    scanned = Transformer(cfg)
    variables = init_variables(scanned)
    biases = variables["moe_bias"]
    variables["moe_bias"] = jax.tree.map(
        lambda b: 0.2 * jax.random.normal(jax.random.key(5), b.shape), biases
    )
    batch = arithmetic_batch(2, 32)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    apply = jax.jit(lambda model, v: model.apply(v, *args, mutable=["moe_metrics"]), static_argnums=0)
    want, want_metrics = apply(scanned, variables)
    unrolled_vars = {k: unroll(cfg, v) for k, v in variables.items()}
    unrolled = Transformer(dataclasses.replace(cfg, scan_layers=False))
    got, got_metrics = apply(unrolled, unrolled_vars)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        got_metrics["moe_metrics"], unroll(cfg, want_metrics["moe_metrics"]),
    )
    tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    abstract = nn.meta.unbox(jax.eval_shape(unrolled.init, jax.random.key(0), tokens))
    abstract.pop("moe_metrics", None)
    assert jax.tree.structure(abstract) == jax.tree.structure(unrolled_vars)


def train_steps(cfg, grad_accum, steps=1, mesh_config=MeshConfig(data=1, fsdp=2, tensor=4)):
    train = TrainConfig(batch_size=8, seq_len=32, grad_accum=grad_accum, steps=10, warmup_steps=1)
    config = Config(model=cfg, mesh=mesh_config, train=train)
    mesh = parallel.make_mesh(config)
    model, tx = Transformer(cfg), make_optimizer(train)
    state, shardings = init_state(model, tx, train.seq_len, mesh, jax.random.key(0))
    initial = jax.device_get(state)
    batch = jax.device_put(arithmetic_batch(8, 32), parallel.batch_sharding(mesh))
    with parallel.use_mesh(mesh):
        step = jit_train_step(model, tx, train, learning_rate_schedule(train), mesh, shardings)
        for _ in range(steps):
            state, metrics = step(state, batch)
    return initial, jax.device_get(state), jax.device_get(metrics)


def test_a_lora_step_leaves_the_base_models_selection_biases():
    """The aux-loss-free bias step belongs to the base model, which LoRA freezes."""
    moe = dataclasses.replace(DEEPSEEK_LIKE, moe_every=1, first_dense_layers=0)
    cfg = tiny_model(num_layers=1, moe=moe, lora=LoRAConfig(rank=2, targets="q,v"))
    initial, state, _ = train_steps(cfg, grad_accum=1)
    assert jax.tree.leaves(initial.moe_bias)
    for before, after in zip(jax.tree.leaves(initial.moe_bias), jax.tree.leaves(state.moe_bias)):
        np.testing.assert_array_equal(before, after)
    _, unadapted, _ = train_steps(dataclasses.replace(cfg, lora=None), grad_accum=1)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial.moe_bias),
                                                         jax.tree.leaves(unadapted.moe_bias)))


@pytest.mark.slow
def test_train_step_updates_biases_from_the_whole_batch_load_and_logs_moe_metrics():
    moe = dataclasses.replace(DEEPSEEK_LIKE, moe_every=1)
    cfg = tiny_model(num_layers=3, remat="full", moe=moe)  # the sown loads survive remat
    initial, state, metrics = train_steps(cfg, grad_accum=1)
    _, accumulated, accumulated_metrics = train_steps(cfg, grad_accum=4)

    batch = arithmetic_batch(8, 32)
    _, sown = jax.jit(lambda v: Transformer(cfg).apply(
        v, batch["inputs"], batch["positions"], batch["segment_ids"], mutable=["moe_metrics"]
    ))({"params": initial.params, "moe_bias": initial.moe_bias})
    load = sown["moe_metrics"]["decoder"]["layers"]["moe"]["tokens_per_expert"]  # [2, 8]
    bias = initial.moe_bias["decoder"]["layers"]["moe"]["e_score_correction_bias"]
    want = router.bias_update(bias, load, 0.01)
    for got in (state, accumulated):
        np.testing.assert_allclose(
            got.moe_bias["decoder"]["layers"]["moe"]["e_score_correction_bias"], want, atol=1e-7
        )
    assert not np.allclose(want, bias)

    for layer in (1, 2):
        fractions = [metrics[f"moe/layer_{layer}/load_fraction_{e}"] for e in range(8)]
        np.testing.assert_allclose(sum(fractions), 1.0, rtol=1e-5)
        prefix = f"moe/layer_{layer}"
        np.testing.assert_allclose(
            metrics[f"{prefix}/load_max_over_mean"], 8 * max(fractions), rtol=1e-5
        )
        assert metrics[f"{prefix}/dropped_fraction"] == 0.0
        for name in ("load_balance_loss", "seq_aux_loss", "router_z_loss", "aux_loss"):
            np.testing.assert_allclose(
                accumulated_metrics[f"{prefix}/{name}"], metrics[f"{prefix}/{name}"], rtol=0.2
            )
    assert "moe/layer_0/aux_loss" not in metrics
    total = sum(metrics[f"moe/layer_{layer}/aux_loss"] for layer in (1, 2))
    np.testing.assert_allclose(metrics["moe/aux_loss"], total, rtol=1e-6)
    np.testing.assert_allclose(accumulated_metrics["loss"], metrics["loss"], rtol=1e-5)


def test_aux_losses_reach_the_router_gradient():
    """The weighted aux losses are part of the differentiated loss: turning the Switch loss
    on changes the router's gradient."""
    batch = arithmetic_batch(2, 16)
    softmax = MoEConfig(num_experts=4, experts_per_token=2, expert_dim=16)
    params = init_variables(Transformer(tiny_model(num_layers=1, moe=softmax)))["params"]
    grads = {}
    for name, weight in (("off", 0.0), ("on", 1.0)):
        cfg = tiny_model(num_layers=1, moe=dataclasses.replace(softmax, load_balance_loss=weight))
        loss = functools.partial(dense_loss_sums, batch=batch, model=Transformer(cfg), z_loss=0.0)
        grad = jax.jit(jax.grad(loss, has_aux=True))
        grads[name] = grad(params)[0]["decoder"]["layers"]["moe"]["router"]["kernel"]
    assert not np.allclose(grads["on"], grads["off"])


def test_expert_kernels_shard_over_the_expert_axis():
    cfg = tiny_model(num_layers=2, moe=MoEConfig(num_experts=4, expert_dim=16, router="sigmoid"))
    boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=1, fsdp=2, expert=2, tensor=2)))
    specs = jax.tree.map(lambda s: s.spec, parallel.shardings(boxed, mesh))
    moe = specs["params"]["decoder"]["layers"]["moe"]
    assert moe["wi"] == P(None, "expert", "fsdp", None, "tensor")
    assert moe["wo"] == P(None, "expert", "tensor", "fsdp")
    assert moe["router"]["kernel"] == P(None, "fsdp", None)
    bias = specs["moe_bias"]["decoder"]["layers"]["moe"]["e_score_correction_bias"]
    assert bias == P(None, None)


def test_aux_loss_free_balancing_evens_out_a_skewed_router():
    """Fixed router logits that favour the first experts: the bias update alone brings the
    max/mean load under 1.3 within 300 steps."""
    cfg = MoEConfig(num_experts=8, experts_per_token=2, router="sigmoid")
    skew = jnp.linspace(2.0, -2.0, 8)
    logits = jax.random.normal(jax.random.key(0), (1024, 8)) + skew

    def step(bias, _):
        _, experts, _ = router.route(logits, bias, cfg)
        load = router.expert_counts(experts, 8)
        return router.bias_update(bias, load, 0.01), load.max() / load.mean()

    _, ratios = jax.jit(lambda: jax.lax.scan(step, jnp.zeros(8), length=300))()
    assert ratios[0] > 3.0
    assert ratios[-1] < 1.3, ratios[-10:]


def test_matmul_params_count_only_the_chosen_experts():
    """E=8 top-2 costs what E=2 top-2 costs, but for the wider router."""
    moe = MoEConfig(num_experts=8, experts_per_token=2, expert_dim=32, first_dense_layers=1)
    cfg = tiny_model(num_layers=3, moe=moe)
    two = dataclasses.replace(cfg, moe=dataclasses.replace(moe, num_experts=2))
    count = count_params(abstract_params(Transformer(cfg)))
    want = matmul_params(two, count_params(abstract_params(Transformer(two)))) + 2 * 64 * 6
    assert matmul_params(cfg, count) == want


@pytest.mark.parametrize("family", ["mixtral", "deepseek", "deepseek_v32", "llama4", "kimi",
                                    "qwen3"])
def test_moe_preset_run_configs_round_trip_through_json(family, tmp_path):
    config = presets.run_config(f"tiny_{family}")
    assert config.model.moe is not None
    config_lib.save(config, tmp_path / "config.json")
    assert config_lib.from_dict(json.loads((tmp_path / "config.json").read_text())) == config


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "deepseek", "llama4"])
def test_each_tiny_moe_preset_learns(family):
    """One preset per routing scheme: softmax top-k, grouped sigmoid with bias balancing
    (tiny_kimi is tiny_deepseek with other sizes), and top-1 sigmoid with dense layers."""
    config = presets.run_config(f"tiny_{family}")
    config = config_lib.apply_overrides(config, [
        "train.steps=30", "train.warmup_steps=5", "train.batch_size=8", "train.seq_len=32",
        "train.log_every=10", "mesh.data=2", "mesh.expert=4",
        "workdir=none",
    ])
    history = pretrain(config, log=lambda line: None)
    first, last = history[0]["loss"], history[-1]["loss"]
    assert last < 0.6 * first, (first, last)
    assert history[-1]["moe/aux_loss"] >= 0 and history[-1]["moe/layer_1/dropped_fraction"] == 0
