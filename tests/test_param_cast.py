"""cast_param: the values and gradient of `astype`, and in a scanned stack compiled for TPU,
no bf16 copy of the whole float32 parameter stack before the loop."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import parallel, presets
from jaxllm.compile import aot, topology
from jaxllm.nn.param_cast import cast_param

AXES = ("embed", None, "mlp")


def special_values() -> np.ndarray:
    """Random normals, and values at bf16 rounding ties, subnormals, infinities and zeros."""
    ties = np.array([0x3F808000, 0x3F818000, 0x3F80C000, 0x00000001, 0x007FFFFF, 0x7F7FFFFF],
                    np.uint32).view(np.float32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -3.4e38], np.float32)
    normals = np.random.default_rng(0).standard_normal(4 * 2 * 6 - 12).astype(np.float32)
    return np.concatenate([ties, edges, normals]).reshape(4, 2, 6)


def test_the_values_are_those_of_astype():
    x = jnp.asarray(special_values())
    got = jax.jit(lambda w: cast_param(w, jnp.bfloat16, AXES))(x)
    want = x.astype(jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                  np.asarray(want).view(np.uint16))


def test_the_gradient_is_that_of_astype():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 2, 6)), jnp.float32)

    def loss(cast):
        return lambda w: jnp.sum(jnp.sin(cast(w).astype(jnp.float32)) * jnp.arange(6.0))

    got = jax.jit(jax.grad(loss(lambda w: cast_param(w, jnp.bfloat16, AXES))))(x)
    want = jax.grad(loss(lambda w: w.astype(jnp.bfloat16)))(x)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("param_dtype, dtype", [
    (jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16)])
def test_a_cast_from_anything_but_float32_to_narrower_is_plain(param_dtype, dtype):
    x = jnp.ones((4, 2, 6), param_dtype)
    text = jax.jit(lambda w: cast_param(w, dtype, AXES)).lower(x).as_text()
    assert "optimization_barrier" not in text


@pytest.mark.parametrize("axes, folded", [
    (AXES, "8x6"), (("heads", "head_dim", "embed"), "8x6"), (("embed", "heads", None), "4x12")])
def test_a_narrowing_cast_passes_the_bits_through_a_barrier_with_unsharded_axes_folded(
        axes, folded):
    x = jnp.ones((4, 2, 6), jnp.float32)
    with nn.logical_axis_rules(parallel.RULES):
        text = jax.jit(lambda w: cast_param(w, jnp.bfloat16, axes)).lower(x).as_text()
    assert re.search(rf"optimization_barrier %\S+ : tensor<{folded}xui32>", text)


def test_a_scanned_stack_casts_each_layer_inside_the_loop_on_tpu():
    """The compiled entry computation converts no float32 [layers, ...] parameter to bf16:
    without cast_param, bfloat16 propagation does, once, before the forward loop."""
    layers = 4
    config = config_lib.Config(
        model=dataclasses.replace(presets.tiny_dense(), num_layers=layers, dtype="bfloat16"),
        mesh=config_lib.MeshConfig(data=1, fsdp=4),
        train=config_lib.TrainConfig(batch_size=8, seq_len=128),
    )
    text = aot.compile_step(*aot.prepare(config, topology.parse("v5e-4"))).as_text()
    entry = text[text.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    stacked = re.findall(rf"= bf16\[{layers},[^\]]*\]\S* convert\(", entry)
    assert not stacked, stacked
