"""kernel=mosaic_gmm (jax's Mosaic GPU ragged dot, interpret mode on CPU) against the ragged_dot
kernel on values and gradients, alone and per device inside shard_map; the kernels lowered
for CUDA; the meshes, platforms, widths and dtypes it refuses."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from jaxllm import Config, ConfigError, MeshConfig, ModelConfig, parallel
from jaxllm.config import validate
from jaxllm.nn.experts import mosaic_swiglu, ragged_swiglu
from test_expert_parallel import DEEPSEEK_LIKE, moe_grads
from test_gmm import assert_close, make_mesh, routed_grads, tpu_mesh
from test_gpu_attention import gpu_mesh
from test_moe import init_moe
from test_triton_experts import routed_grad_lowered_for_cuda

# 60 rows make half a row tile: the tiles overhang the rows. 2F = 128 takes one column tile
# of 128 and D = 64 one of 64. Groups cross tile boundaries; empty experts come first,
# between and last, and one takes every row.
EMBED, HIDDEN, NUM_EXPERTS, ROWS = 64, 64, 5, 60
GROUP_SIZES = [(0, 17, 0, 43, 0), (0, 0, 60, 0, 0), (12, 12, 12, 12, 12)]


def swiglu_grads(fn):
    """The jitted value and (x, wi, wo) gradients of sum(fn(x, group_sizes, wi, wo) * c)."""
    cotangent = jax.random.normal(jax.random.key(3), (ROWS, EMBED)) / ROWS**0.5

    def loss(x, wi, wo, group_sizes):
        return jnp.sum(fn(x, group_sizes, wi, wo) * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def test_mosaic_swiglu_equals_ragged_dot():
    x = jax.random.normal(jax.random.key(0), (ROWS, EMBED))
    wi = jax.random.normal(jax.random.key(1), (NUM_EXPERTS, EMBED, 2, HIDDEN)) / EMBED**0.5
    wo = jax.random.normal(jax.random.key(2), (NUM_EXPERTS, HIDDEN, EMBED)) / HIDDEN**0.5
    got, want = swiglu_grads(mosaic_swiglu), swiglu_grads(ragged_swiglu)  # each compiled once
    for sizes in GROUP_SIZES:
        group_sizes = jnp.array(sizes, jnp.int32)
        assert_close(got(x, wi, wo, group_sizes), want(x, wi, wo, group_sizes))


def test_routed_mosaic_gmm_masks_the_dropped_choices_like_ragged_dot():
    """Gradients w.r.t. x, the routing weights, wi and wo; capacity 3 of 12 tokens, top-2 of
    4 experts, drops choices."""
    x = jax.random.normal(jax.random.key(0), (12, EMBED))
    weights = jax.random.uniform(jax.random.key(1), (12, 2))
    experts = jax.random.randint(jax.random.key(2), (12, 2), 0, 4)
    wi = 0.1 * jax.random.normal(jax.random.key(10), (4, EMBED, 2, HIDDEN))
    wo = 0.1 * jax.random.normal(jax.random.key(11), (4, HIDDEN, EMBED))
    args = (3, x, weights, experts, wi, wo)
    assert_close(routed_grads("mosaic_gmm", *args), routed_grads("ragged_dot", *args))


def test_mosaic_gmm_layer_inside_shard_map_on_one_device_equals_ragged_dot():
    """The per-device path (`gmm_experts.per_device`) on a mesh of one device, the largest
    the interpreter takes."""
    cfg = dataclasses.replace(DEEPSEEK_LIKE, expert_dim=HIDDEN)
    x = jax.random.normal(jax.random.key(0), (4, 8, EMBED))
    cotangent = jax.random.normal(jax.random.key(3), x.shape)
    variables = init_moe(cfg, x, bias_seed=2)
    want = moe_grads(dataclasses.replace(cfg, kernel="ragged_dot"), variables, x, cotangent)
    mosaic = dataclasses.replace(cfg, kernel="mosaic_gmm")
    *got, _, _ = moe_grads(mosaic, variables, x, cotangent, make_mesh(MeshConfig(data=1), 1))
    assert_close(tuple(got), want[:3])


def test_mosaic_gmm_off_gpu_refuses_a_mesh_of_several_devices():
    """The interpreter takes one device at a time: under a mesh it would hang, so it refuses.
    (On a GPU the kernel runs per device as gmm and triton_gmm do, through the same
    `gmm_experts.per_device`, whose sharding their tests check.)"""
    cfg = dataclasses.replace(DEEPSEEK_LIKE, expert_dim=HIDDEN, kernel="mosaic_gmm")
    x = jax.random.normal(jax.random.key(0), (4, 8, EMBED))
    variables = init_moe(dataclasses.replace(cfg, kernel="ragged_dot"), x)
    with pytest.raises(ValueError, match="^mosaic_gmm off GPU runs in Mosaic GPU interpret "
                                         "mode, which takes one device at a time, not a mesh "
                                         "of 8; use another kernel there"):
        moe_grads(cfg, variables, x, jnp.ones_like(x), make_mesh(MeshConfig(data=8), 8))


class Hopper:
    """A local device as the dW kernel sees it on an H100: it sizes its grid by the SMs."""

    core_count = 132

    def __init__(self, device):
        self.device = device

    def __getattr__(self, name):
        return getattr(self.device, name)


def test_mosaic_gmm_lowers_for_cuda_forward_and_backward_and_auto_stays_block_sparse(
        monkeypatch):
    """The real kernels, not interpret mode: two grouped matmuls forward, and for each a dx
    and a dW kernel backward. The dW kernel runs only on a GPU, so this is its one check on
    a CPU. "auto" does not pick mosaic_gmm until a GPU run has measured it."""
    local_devices = jax.devices
    monkeypatch.setattr(jax, "devices", lambda *a: [Hopper(d) for d in local_devices(*a)])
    lowered = routed_grad_lowered_for_cuda("mosaic_gmm", hidden=192)
    assert lowered.as_text().count("custom_call @mosaic_gpu") == 6


def float32_inputs():
    """mosaic_swiglu's (x, group_sizes, wi, wo), x and the kernels in float32."""
    return (jnp.zeros((ROWS, EMBED)), jnp.array(GROUP_SIZES[0], jnp.int32),
            jnp.zeros((NUM_EXPERTS, EMBED, 2, HIDDEN)), jnp.zeros((NUM_EXPERTS, HIDDEN, EMBED)))


def test_mosaic_gmm_on_gpu_refuses_float32():
    with jax.sharding.use_abstract_mesh(gpu_mesh()):
        with pytest.raises(ValueError, match="^mosaic_gmm takes bfloat16 or float16 "
                                             "activations, not float32"):
            jax.eval_shape(mosaic_swiglu, *float32_inputs())


def test_mosaic_gmm_refuses_a_tpu():
    inputs = float32_inputs()  # made on the local CPU, outside the TPU mesh
    with parallel.use_mesh(tpu_mesh(MeshConfig(data=4))):
        with pytest.raises(ValueError, match="^mosaic_gmm is a GPU kernel; on TPU use gmm"):
            jax.eval_shape(mosaic_swiglu, *inputs)


@pytest.mark.parametrize("field, model", [
    ("model.embed_dim", dict(embed_dim=96, moe_expert_dim=64)),
    ("model.moe.expert_dim", dict(embed_dim=64, moe_expert_dim=32)),
])
def test_config_refuses_widths_off_the_mosaic_gmm_tiles(field, model):
    moe = dataclasses.replace(DEEPSEEK_LIKE, kernel="mosaic_gmm",
                              expert_dim=model["moe_expert_dim"])
    config = Config(model=ModelConfig(embed_dim=model["embed_dim"], num_heads=2, num_kv_heads=2,
                                      moe=moe))
    with pytest.raises(ConfigError, match=rf"^{field}: \d+ must be a multiple of 64 for the "
                                          "mosaic_gmm kernel's tiles$"):
        validate(config)
