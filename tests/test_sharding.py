"""Sharded meshes against one device: same loss and gradients, parameters laid out by the rules."""

import flax.linen as nn
import jax
from flax import traverse_util
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import arithmetic_batch, init_params, loss_and_grads, tiny_model
from jaxllm import Config, MeshConfig, parallel, presets
from jaxllm.nn import Transformer

MESHES = {
    "data8": MeshConfig(data=8),
    "fsdp8": MeshConfig(data=1, fsdp=8),
    "data2_fsdp2_tensor2": MeshConfig(data=2, fsdp=2, tensor=2),
    "tensor4_data2": MeshConfig(data=2, tensor=4),
}


@pytest.fixture(scope="module")
def reference():
    model = Transformer(tiny_model())
    params = init_params(model)
    batch = arithmetic_batch(8, 32)
    mesh = parallel.make_mesh(Config(), devices=jax.devices()[:1])
    loss, grads, _ = loss_and_grads(model, params, batch, mesh)
    return model, params, batch, loss, grads


@pytest.mark.parametrize("mesh_name", MESHES)
def test_sharded_loss_and_gradients_match_one_device(reference, mesh_name):
    model, params, batch, want_loss, want_grads = reference
    mesh = parallel.make_mesh(Config(mesh=MESHES[mesh_name]))
    assert mesh.size == 8
    loss, grads, _ = loss_and_grads(model, params, batch, mesh)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5), grads, want_grads
    )


def test_parameters_are_sharded_as_the_rules_say(reference):
    model, params, batch, _, _ = reference
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=2, fsdp=2, tensor=2)))
    _, _, placed = loss_and_grads(model, params, batch, mesh)
    layers = placed["decoder"]["layers"]
    expected = {
        # (array, spec, shape of one shard)
        "query": (layers["attn"]["query"]["kernel"], P(None, "fsdp", "tensor", None), (2, 32, 4, 8)),
        "key": (layers["attn"]["key"]["kernel"], P(None, "fsdp", "tensor", None), (2, 32, 2, 8)),
        "out": (layers["attn"]["out"]["kernel"], P(None, "tensor", None, "fsdp"), (2, 4, 8, 32)),
        "wi": (layers["mlp"]["wi"]["kernel"], P(None, "fsdp", None, "tensor"), (2, 32, 2, 64)),
        "wo": (layers["mlp"]["wo"]["kernel"], P(None, "tensor", "fsdp"), (2, 64, 32)),
        "embedding": (placed["embedding"], P("tensor", "fsdp"), (192, 32)),
        "head": (placed["head"]["kernel"], P("fsdp", "tensor"), (32, 192)),
        "norm": (layers["attn_norm"]["scale"], P(None, None), (2, 64)),
    }
    for name, (array, spec, shard_shape) in expected.items():
        assert array.sharding.spec == spec, name
        assert array.addressable_shards[0].data.shape == shard_shape, name


@pytest.mark.parametrize("preset", [n for n in presets.PRESETS if n.startswith("tiny")])
def test_fsdp_splits_every_weight_matrix_of_every_preset(preset):
    """No weight matrix (two or more axes of 16 or more) is left whole on each device of an
    fsdp mesh (MLA's up-projections, which have no embed axis, once were)."""
    boxed = jax.eval_shape(Transformer(presets.PRESETS[preset]()).init, jax.random.key(0),
                           jnp.zeros((1, 8), jnp.int32))["params"]
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=1, fsdp=8)))
    shardings = traverse_util.flatten_dict(parallel.shardings(boxed, mesh))
    shapes = traverse_util.flatten_dict(nn.meta.unbox(boxed))
    whole = ["/".join(path) for path, sharding in shardings.items()
             if "fsdp" not in sharding.spec and sum(d >= 16 for d in shapes[path].shape) >= 2]
    assert not whole


def test_axes_that_do_not_divide_a_dimension_leave_it_replicated():
    """MQA's single kv head cannot be split over tensor=2: that dimension stays whole."""
    model = Transformer(tiny_model(num_kv_heads=1))
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=4, tensor=2)))
    shardings = parallel.shardings(boxed, mesh)
    assert shardings["decoder"]["layers"]["attn"]["key"]["kernel"].spec == P(None, "fsdp", None, None)
    assert shardings["decoder"]["layers"]["attn"]["query"]["kernel"].spec == P(
        None, "fsdp", "tensor", None
    )
    assert isinstance(nn.get_partition_spec(boxed)["embedding"], P)
