"""kernel=gmm (Pallas megablox, interpret mode on CPU) against a loop over experts and the
ragged_dot kernel on values and gradients; its sharding; "auto" on TPU; a TPU compile."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm import Config, MeshConfig, MoEConfig, parallel
from jaxllm.nn.experts import resolve_kernel, routed_experts
from jaxllm.nn.gmm_experts import gmm_swiglu, tiling
from jaxllm.nn.moe import MoE
from test_expert_parallel import DEEPSEEK_LIKE, MESHES, make_mesh, moe_grads
from test_moe import init_moe, swiglu

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32


def assert_close(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE), got, want)


def test_tiling_follows_the_mean_group_and_a_tile_common_to_both_dims():
    assert tiling(65536, 7168, 4096, 256) == (256, 1024, 1024)  # DeepSeek-V3 up projection
    assert tiling(65536, 768, 2048, 128) == (512, 256, 256)  # Qwen3-MoE down projection
    assert tiling(8192, 384, 256, 4) == (512, 128, 128)  # rows capped; dims share 128
    assert tiling(150, 8, 32, 6) == (128, 128, 128)  # at least 128; small dims in one tile
    assert tiling(20, 8, 32, 4) == (24, 128, 128)  # few rows: one tile of all, rounded to 8


def loop_over_experts(x, group_sizes, wi, wo):
    """Each expert's rows, sliced out in Python, through its own SwiGLU."""
    starts = np.cumsum((0,) + group_sizes)
    return jnp.concatenate(
        [swiglu(x[starts[e]:starts[e + 1]], wi[e], wo[e]) for e in range(len(group_sizes))]
    )


# (D, F): several group sizes of one shape. 150 rows take row tiles of 128 and pad to 256,
# with groups that cross a tile boundary; D = 384 takes three k tiles of 128.
SHAPES = {
    (8, 16): [(0, 70, 0, 41, 39, 0), (0, 0, 150, 0, 0, 0)],
    (384, 128): [(40, 0, 90, 20, 0, 0)],
}


@pytest.mark.parametrize("embed, hidden", SHAPES)
def test_gmm_swiglu_matches_a_loop_over_experts(embed, hidden):
    """Uneven groups, empty experts (first, between and last), every row on one expert."""
    num_experts, rows = 6, 150
    x = jax.random.normal(jax.random.key(0), (rows, embed))
    wi = jax.random.normal(jax.random.key(1), (num_experts, embed, 2, hidden)) / embed**0.5
    wo = jax.random.normal(jax.random.key(2), (num_experts, hidden, embed)) / hidden**0.5
    cotangent = jax.random.normal(jax.random.key(3), (rows, embed)) / rows**0.5

    def grads(fn):
        loss = lambda x, wi, wo, *rest: jnp.sum(fn(x, wi, wo, *rest) * cotangent)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    gmm_grads = grads(lambda x, wi, wo, sizes: gmm_swiglu(x, sizes, wi, wo))  # compiled once
    for group_sizes in SHAPES[embed, hidden]:
        want = grads(lambda x, wi, wo: loop_over_experts(x, group_sizes, wi, wo))(x, wi, wo)
        assert_close(gmm_grads(x, wi, wo, jnp.array(group_sizes, jnp.int32)), want)


def routed_grads(kernel, capacity, x, weights, experts, wi, wo):
    def loss(x, weights, wi, wo):
        y, _ = routed_experts(x, weights, experts, wi, wo, capacity=capacity, kernel=kernel)
        return jnp.sum(jnp.sin(y))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, weights, wi, wo)


def dropping_case():
    """`routed_grads`' (capacity, x, weights, experts, wi, wo): capacity 3 of 12 tokens, top-2
    of 4 experts, drops choices."""
    x = jax.random.normal(jax.random.key(0), (12, 8))
    weights = jax.random.uniform(jax.random.key(1), (12, 2))
    experts = jax.random.randint(jax.random.key(2), (12, 2), 0, 4)
    wi = 0.3 * jax.random.normal(jax.random.key(10), (4, 8, 2, 6))
    wo = 0.3 * jax.random.normal(jax.random.key(11), (4, 6, 8))
    return 3, x, weights, experts, wi, wo


def test_routed_gmm_masks_the_dropped_choices_like_ragged_dot():
    """Gradients w.r.t. x, the routing weights, wi and wo."""
    args = dropping_case()
    assert_close(routed_grads("gmm", *args), routed_grads("ragged_dot", *args))


@functools.cache
def moe_case():
    """(variables, x, cotangent, ragged_dot's (output, loss, grads) on one device) of a
    DeepSeek-like MoE layer, shared by the tests below."""
    x = jax.random.normal(jax.random.key(0), (4, 8, 16))
    cotangent = jax.random.normal(jax.random.key(3), x.shape)
    variables = init_moe(DEEPSEEK_LIKE, x, bias_seed=2)
    ragged_dot = dataclasses.replace(DEEPSEEK_LIKE, kernel="ragged_dot")
    return variables, x, cotangent, moe_grads(ragged_dot, variables, x, cotangent)[:3]


GMM = dataclasses.replace(DEEPSEEK_LIKE, kernel="gmm")


def test_moe_layer_with_gmm_matches_ragged_dot():
    variables, x, cotangent, want = moe_case()
    assert_close(moe_grads(GMM, variables, x, cotangent)[:3], want)


def test_expert_parallel_gmm_matches_one_device():
    """data=2 x expert=4: gmm runs per device inside the all_to_all shard_map."""
    variables, x, cotangent, want = moe_case()
    mesh = make_mesh(*MESHES["data2_expert4"])
    *got, metrics, hlo = moe_grads(GMM, variables, x, cotangent, mesh)
    assert "all-to-all" in hlo
    assert_close(tuple(got), want)
    assert float(metrics["dropped_fraction"]) == 0.0


def shard_map_inputs(jaxpr) -> list[list[tuple[int, ...]]]:
    """The per-device shapes of every shard_map's inputs in `jaxpr`, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            found.append([v.aval.shape for v in eqn.params["jaxpr"].invars])
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += shard_map_inputs(inner)
    return found


def test_sharded_gmm_splits_tokens_and_hidden_and_matches_one_device():
    """data=2 x tensor=4, no expert axis: each device runs its 16 of the 32 tokens with
    every expert's F/4 = 4 hidden units, and a psum adds the down projections over tensor.
    The Pallas call is inside a shard_map even where the tokens do not split."""
    variables, x, cotangent, want = moe_case()
    mesh = make_mesh(MeshConfig(data=2, tensor=4), 8)
    *got, metrics, hlo = moe_grads(GMM, variables, x, cotangent, mesh)
    assert "all-reduce" in hlo
    assert_close(tuple(got), want)
    assert float(metrics["dropped_fraction"]) == 0.0
    k, experts = GMM.experts_per_token, GMM.num_experts
    for tokens, local in ((32, 16), (7, 7)):  # 7 tokens do not split: repeated over data
        with parallel.use_mesh(mesh):
            jaxpr = jax.make_jaxpr(MoE(GMM).apply)(variables, x.reshape(-1, 16)[None, :tokens])
        assert shard_map_inputs(jaxpr.jaxpr) == [
            [(local, 16), (local, k), (local, k), (experts, 16, 2, 4), (experts, 4, 16)]
        ]


def test_sharded_capacity_gives_each_token_shard_its_share_of_the_slots():
    """Under data=2, capacity 5 of 16 tokens is ceil(5 / 2) = 3 slots per shard of 8."""
    x = jax.random.normal(jax.random.key(0), (16, 8))
    weights = jax.random.uniform(jax.random.key(1), (16, 2))
    experts = jax.random.randint(jax.random.key(2), (16, 2), 0, 4)
    wi = 0.3 * jax.random.normal(jax.random.key(10), (4, 8, 2, 6))
    wo = 0.3 * jax.random.normal(jax.random.key(11), (4, 6, 8))
    run = jax.jit(routed_experts, static_argnames=("capacity", "kernel"))
    with jax.set_mesh(make_mesh(MeshConfig(data=2), 2)):
        y, dropped = run(x, weights, experts, wi, wo, capacity=5, kernel="gmm")
    shards = [run(x[s], weights[s], experts[s], wi, wo, capacity=3, kernel="ragged_dot")
              for s in (slice(0, 8), slice(8, 16))]
    assert_close(y, jnp.concatenate([shard[0] for shard in shards]))
    np.testing.assert_allclose(dropped, np.mean([shard[1] for shard in shards]), rtol=1e-6)
    assert float(dropped) > 0


def tpu_mesh(mesh_config: MeshConfig):
    """A mesh of v5e TPU devices that exist only for compilation."""
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    return parallel.make_mesh(Config(mesh=mesh_config), devices)


def test_auto_is_tiled_on_cpu_and_gmm_under_a_tpu_mesh():
    assert resolve_kernel("auto") == "tiled"
    with jax.set_mesh(tpu_mesh(MeshConfig(data=4))):
        assert resolve_kernel("auto") == "gmm"
        assert resolve_kernel("ragged_dot") == "ragged_dot"
    assert resolve_kernel("auto") == "tiled"


@pytest.mark.parametrize("mesh_config", [MeshConfig(data=2, tensor=2),
                                         MeshConfig(data=2, expert=2)], ids=["tensor", "expert"])
def test_moe_layer_with_gmm_compiles_for_tpu(mesh_config):
    """The real Mosaic kernel (no interpret mode) in the forward and backward passes: two gmm
    calls forward, a gmm and a tgmm for each backward."""
    mesh = tpu_mesh(mesh_config)
    layer = MoE(MoEConfig(num_experts=4, experts_per_token=2, expert_dim=256, kernel="auto"),
                dtype=jnp.bfloat16)

    def loss(params, x):
        return jnp.mean(layer.apply({"params": params}, x).astype(jnp.float32) ** 2)

    shapes = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, 8, 128)))["params"]
    replicated = NamedSharding(mesh, P())
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          nn.meta.unbox(shapes))
    x = jax.ShapeDtypeStruct((4, 64, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    with parallel.use_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    assert compiled.as_text().count("tpu_custom_call") == 6
