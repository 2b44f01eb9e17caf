"""The splash kernel (Pallas interpret mode on CPU) against the naive kernel on values and
gradients, in whole models and under a mesh; kernel=splash refused where it cannot run;
"auto" per platform; and the real kernel lowered and compiled for a TPU topology."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from helpers import tiny_model
from jaxllm import Config, ConfigError, MeshConfig, parallel
from jaxllm import config as config_lib
from jaxllm.config import AttentionConfig
from jaxllm.nn import Mask, Transformer, attend
from jaxllm.nn.attention import Attention
from jaxllm.nn.attention_kernels import resolve_kernel
from jaxllm.nn.masks import row_indices
from test_infer import random_variables
from test_mla import mla_model

B, H, D = 2, 4, 16


def inputs(length, kv_heads, v_dim, segments, seed=0):
    """q, k, v, a cotangent and [B, S] segment ids: several documents per row, or one."""
    rng = np.random.default_rng(seed)
    shapes = [(B, length, H, D), (B, length, kv_heads, D), (B, length, kv_heads, v_dim),
              (B, length, H, v_dim)]
    arrays = [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes]
    index = np.arange(length)
    cuts = [[length // 3, length // 2 + 3], [7, 2 * length // 3]] if segments else [[], []]
    seg = np.stack([np.searchsorted(c, index, side="right") for c in cuts])
    return (*arrays, jnp.asarray(seg, jnp.int32))


def outputs_and_grads(kernel, mask, q, k, v, cotangent, seg, scale=None):
    """`attend`'s output and its gradients w.r.t. q, k and v, jitted."""

    @jax.jit
    def run(q, k, v, cotangent, seg):
        idx = row_indices(seg)
        out, vjp = jax.vjp(lambda *qkv: attend(*qkv, idx, seg, idx, seg, mask=mask,
                                                scale=scale, kernel=kernel), q, k, v)
        return (out, *vjp(cotangent))

    return run(q, k, v, cotangent, seg)


def assert_close(got, want, atol=1e-5):
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(x, y, atol=atol, err_msg=name)


CASES = {  # mask, S, kv heads, v head dim, packed documents, scale
    "global_mha": (Mask(), 128, 4, D, False, None),
    "sliding_gqa_packed": (Mask("sliding", window=9), 128, 2, D, True, None),
    "chunked_mqa_packed": (Mask("chunked", chunk=32), 128, 1, D, True, 0.3),
    "global_mla_padded": (Mask(), 100, 4, 8, True, None),  # v narrower than q, k; S % 128
}


@pytest.mark.parametrize("name", CASES)
def test_splash_equals_naive_on_values_and_gradients(name):
    mask, length, kv_heads, v_dim, segments, scale = CASES[name]
    args = inputs(length, kv_heads, v_dim, segments)
    assert_close(outputs_and_grads("splash", mask, *args, scale),
                 outputs_and_grads("naive", mask, *args, scale))


@pytest.mark.parametrize("kv_heads", [2, 1])  # tensor=2 splits 2 kv heads, not 1
def test_splash_under_a_mesh_equals_naive_without_one(kv_heads):
    mask, args = Mask("sliding", window=20), inputs(128, kv_heads, D, segments=True)
    want = outputs_and_grads("naive", mask, *args)
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=2, fsdp=2, tensor=2)))
    with parallel.use_mesh(mesh):
        got = outputs_and_grads("splash", mask, *args)
    assert_close(got, want)


@pytest.mark.parametrize("name", ["gqa", "mla"])
def test_splash_model_equals_naive_model_with_the_same_params(name):
    if name == "gqa":
        cfg = tiny_model(attention=AttentionConfig(
            pattern="sliding,chunked", positions="rope,none", window=5, chunk=8, kernel="naive"))
    else:  # qk head dim 12, v head dim 8
        cfg = dataclasses.replace(mla_model(), attention=dataclasses.replace(
            mla_model().attention, kernel="naive"))
    splash_cfg = dataclasses.replace(
        cfg, attention=dataclasses.replace(cfg.attention, kernel="splash"))
    naive, splash = Transformer(cfg), Transformer(splash_cfg)
    variables = random_variables(naive)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 384, (B, 24)), jnp.int32)
    segments = jnp.asarray(inputs(24, 1, D, segments=True)[-1])
    logits = [jax.jit(model.apply)(variables, tokens, segment_ids=segments)
              for model in (splash, naive)]
    np.testing.assert_allclose(*logits, atol=1e-5)


@pytest.mark.parametrize("attention, message", [
    (AttentionConfig(pattern="global", positions="rope,alibi"),
     "splash does not run alibi positions (layer 1); use kernel=auto or blockwise"),
    (AttentionConfig(pattern="sliding,strided"),
     "splash does not run strided layers (layer 1); use kernel=auto or blockwise"),
    (AttentionConfig(pattern="sparse,global", sparse=config_lib.SparseConfig()),
     "splash does not run sparse layers (layer 0); use kernel=auto or blockwise"),
])
def test_config_refuses_layers_splash_cannot_run(attention, message):
    config = Config(model=tiny_model(attention=dataclasses.replace(attention, kernel="splash")))
    with pytest.raises(ConfigError, match=f"^{re.escape('model.attention.kernel: ' + message)}$"):
        config_lib.validate(config)
    config_lib.validate(dataclasses.replace(config, model=tiny_model(attention=attention)))


def test_config_accepts_splash_for_global_sliding_and_chunked_layers():
    attention = AttentionConfig(pattern="global,sliding,chunked", positions="rope,none",
                                kernel="splash")
    config_lib.validate(Config(model=tiny_model(num_layers=3, attention=attention)))
    layer = Attention(num_heads=1, num_kv_heads=1, head_dim=8)
    assert AttentionConfig().kernel == "auto" and layer.kernel == "auto"


def tpu_mesh():
    """A (data=2, tensor=2) mesh of v5e TPU devices that exist only for compilation."""
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    return parallel.make_mesh(Config(mesh=MeshConfig(data=2, tensor=2)), devices)


WANT = {"global": "splash", "sliding": "splash", "chunked": "splash", "strided": "blockwise"}


def test_auto_is_naive_on_cpu_and_splash_where_it_runs_on_tpu():
    masks = {kind: Mask(kind, window=4, chunk=8, stride=4) for kind in WANT}
    assert {resolve_kernel("auto", m) for m in masks.values()} == {"naive"}
    with jax.set_mesh(tpu_mesh()):
        assert {kind: resolve_kernel("auto", m) for kind, m in masks.items()} == WANT
        assert resolve_kernel("auto", Mask(), alibi=True) == "blockwise"
        assert resolve_kernel("naive", Mask()) == "naive"
    assert resolve_kernel("auto", Mask()) == "naive"


@pytest.mark.parametrize("kernel", ["splash", "auto"])
def test_attention_layer_compiles_the_tpu_kernel_for_a_tpu_mesh(kernel):
    """kernel=splash compiles; "auto" lowers to the same program (compiling it again would
    read the first from the compilation cache, which a topology-only client cannot)."""
    mesh, length, embed = tpu_mesh(), 512, 256
    layer = Attention(num_heads=4, num_kv_heads=2, head_dim=128, kernel=kernel,
                      dtype=jnp.bfloat16)

    def loss(params, x, ids):
        out = layer.apply({"params": params}, x, row_indices(ids), ids)
        return jnp.mean(out.astype(jnp.float32) ** 2)

    shapes = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, 8, embed)),
                            jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32))
    replicated = NamedSharding(mesh, P())
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          shapes["params"])
    batch = NamedSharding(mesh, P("data"))
    x = jax.ShapeDtypeStruct((4, length, embed), jnp.bfloat16, sharding=batch)
    ids = jax.ShapeDtypeStruct((4, length), jnp.int32, sharding=batch)
    with parallel.use_mesh(mesh):
        lowered = jax.jit(jax.value_and_grad(loss)).lower(params, x, ids)
        if kernel == "splash":
            lowered.compile()
    assert "tpu_custom_call" in lowered.as_text()  # the Mosaic kernel, not interpret mode


def test_splash_in_bfloat16_stays_within_bfloat16_rounding_of_float32_naive():
    """bf16 inputs: values and gradients within 3e-2 of the float32 naive kernel, against
    inputs of unit scale (bf16 keeps 8 bits of mantissa: about 4e-3 relative per rounding,
    compounded over the softmax and two matmuls each way)."""
    mask, length, kv_heads, v_dim, segments, scale = CASES["sliding_gqa_packed"]
    args = inputs(length, kv_heads, v_dim, segments)
    bf16 = [x.astype(jnp.bfloat16) for x in args[:4]]
    got = outputs_and_grads("splash", mask, *bf16, args[4], scale)
    rounded = [x.astype(jnp.float32) for x in bf16]  # the same inputs, computed in float32
    want = outputs_and_grads("naive", mask, *rounded, args[4], scale)
    assert all(x.dtype == jnp.bfloat16 for x in got)
    assert_close([x.astype(jnp.float32) for x in got], want, atol=3e-2)
