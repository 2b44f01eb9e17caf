"""Another JAX program uses jaxllm.nn modules with its own params and its own mesh.

This mirrors the README's "Use the modules in your own JAX code" snippet.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm import ModelConfig
from jaxllm.nn import RMSNorm, Transformer
from jaxllm.parallel import RULES


def test_modules_work_with_the_callers_params_and_mesh():
    model = Transformer(ModelConfig(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, mlp_dim=128))
    tokens = jnp.ones((8, 16), jnp.int32)
    mesh = jax.make_mesh((4, 2), ("batch", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("act_batch", "batch"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"))

    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, rules)
    params = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), tokens)
    params = nn.meta.unbox(params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        logits = jax.jit(model.apply)(params, jax.device_put(tokens, NamedSharding(mesh, P("batch"))))

    assert logits.shape == (8, 16, 256)
    query = params["params"]["decoder"]["layers"]["attn"]["query"]["kernel"]
    assert query.sharding.spec == P(None, None, "model", None)
    plain = model.apply(params, tokens)  # the same params, no mesh at all
    np.testing.assert_allclose(logits, plain, atol=1e-5)
    assert {name for name, _ in RULES} >= {"embed", "heads", "act_batch"}


def test_a_single_module_is_usable_on_its_own():
    norm = RMSNorm()
    x = jax.random.normal(jax.random.key(0), (3, 8)) * 5
    y = norm.apply(nn.meta.unbox(norm.init(jax.random.key(1), x)), x)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(y**2, -1)), 1.0, rtol=1e-4)
