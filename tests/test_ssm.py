"""Mamba-2 SSD layers and hybrid stacks: the chunked form against the recurrence, packed
documents against each document alone, sharded against one device, the config checks, the
calculator's state bytes, and a tiny hybrid model learning."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import arithmetic_batch, init_params, loss_and_grads, tiny_model
from jaxllm import Config, ConfigError, MeshConfig, TrainConfig, calculator, parallel, presets
from jaxllm.config import AttentionConfig, SSMConfig, validate
from jaxllm.convert.hf_config import ConversionError, check_exportable
from jaxllm.infer import decode_step, left_pad, prefill
from jaxllm.nn import Transformer
from jaxllm.nn.ssd import document_index, ssd_chunked, ssd_recurrent
from jaxllm.train.loop import pretrain

SSM = SSMConfig(num_heads=4, head_dim=8, state_dim=8, conv_width=4, chunk=4)


def hybrid(pattern: str = "ssm,global", ssm: SSMConfig = SSM, **overrides):
    return tiny_model(attention=AttentionConfig(pattern=pattern, ssm=ssm), **overrides)


def test_document_index_counts_starts_by_position_and_segment():
    positions = jnp.array([[3, 4, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])
    segments = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 0, 0]])
    np.testing.assert_array_equal(document_index(positions, segments),
                                  [[0, 0, 1, 1, 1, 2], [1, 1, 2, 2, 3, 3]])


def ssd_inputs(batch=2, length=13, heads=3, width=4, state=5):
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (batch, length, heads, width))
    dt = jax.nn.softplus(jax.random.normal(keys[1], (batch, length, heads)))
    a = -jnp.exp(jax.random.normal(keys[2], (heads,)))
    b = jax.random.normal(keys[3], (batch, length, state))
    c = jax.random.normal(keys[4], (batch, length, state))
    h0 = jax.random.normal(keys[5], (batch, heads, width, state))
    # row 0 continues the state for 5 tokens, then a document starts; row 1 starts 3 times
    positions = jnp.array([[7, 8, 9, 10, 11] + list(range(8)),
                           [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2]])
    return (x, dt, a, b, c, h0), document_index(positions, jnp.ones_like(positions))


def ssd_loss(form, x, dt, a, b, c, h0, *, doc, weights):
    """A scalar of both outputs of an SSD form (y and the final state), and those outputs."""
    y, h = form(x, dt, a, b, c, doc, state=h0)
    return jnp.sum(y * weights) + jnp.sum(h * h0), (y, h)


@functools.partial(jax.jit, static_argnums=0)
def ssd_values_and_grads(form, inputs, doc, weights):
    loss = functools.partial(ssd_loss, doc=doc, weights=weights)
    (_, outputs), grads = jax.value_and_grad(loss, tuple(range(1, 7)), has_aux=True)(
        form, *inputs)
    return outputs + grads


@pytest.fixture(scope="module")
def recurrence():
    inputs, doc = ssd_inputs()
    weights = jax.random.normal(jax.random.key(9), inputs[0].shape)
    return inputs, doc, weights, ssd_values_and_grads(ssd_recurrent, inputs, doc, weights)


@pytest.mark.parametrize("chunk", [4, 13, 16])  # not dividing 13, one chunk, longer
def test_chunked_form_equals_the_recurrence_in_values_and_gradients(recurrence, chunk):
    inputs, doc, weights, want = recurrence
    form = functools.partial(ssd_chunked, chunk=chunk)
    got = ssd_values_and_grads(form, inputs, doc, weights)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_packed_documents_do_not_leak_state_across_boundaries():
    """An all-SSM model: a row packing two documents gives each the logits it gets alone
    (rows 1 and 2, right-padded: the layers are causal)."""
    model = Transformer(hybrid("ssm"))
    params = init_params(model)
    width = 18
    docs = [np.arange(1, 8), np.arange(40, 49)]
    tokens = np.zeros((3, width), np.int32)
    tokens[0, :16] = np.concatenate(docs)
    tokens[1, :7], tokens[2, :9] = docs
    segments = np.ones((3, width), np.int32)
    segments[0] = np.repeat([1, 2, 0], [7, 9, 2])
    positions = np.tile(np.arange(width), (3, 1))
    positions[0] = np.concatenate([np.arange(7), np.arange(9), np.arange(2)])
    logits = jax.jit(model.apply)({"params": params}, tokens, positions, segments)
    np.testing.assert_allclose(logits[0, :7], logits[1, :7], atol=1e-5)
    np.testing.assert_allclose(logits[0, 7:16], logits[2, :9], atol=1e-5)


def test_sharded_ssm_layer_matches_one_device():
    """Batch over data and fsdp, SSM heads over tensor."""
    model = Transformer(hybrid("ssm", num_layers=1))
    params, batch = init_params(model), arithmetic_batch(8, 32)
    one = parallel.make_mesh(Config(), devices=jax.devices()[:1])
    want_loss, want_grads, _ = loss_and_grads(model, params, batch, one)
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=2, fsdp=2, tensor=2)))
    loss, grads, placed = loss_and_grads(model, params, batch, mesh)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5),
                 grads, want_grads)
    ssm = placed["decoder"]["layers"]["ssm"]
    assert ssm["input"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert ssm["out"]["kernel"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert ssm["a_log"].sharding.spec == P(None, "tensor")


@functools.partial(jax.jit, static_argnums=0)
def prefill_and_step(model, variables, tokens, lengths):
    """The logits after left-padded prompts and after one more token, and the cache."""
    first, cache = prefill(model, variables, tokens, lengths, tokens.shape[1] + 1)
    second, cache = decode_step(model, variables, cache, jnp.argmax(first, -1), lengths)
    return first, second, cache


def test_sharded_ssm_decoding_matches_one_device():
    """Prefill and a decode step on a data x tensor mesh; the state splits rows and heads."""
    model = Transformer(hybrid("ssm", num_layers=1))
    params = init_params(model)
    tokens, lengths = left_pad([[5, 17, 33, 2, 9], [70, 71], [3, 1, 4, 1, 5, 9, 2], [8]], 0)
    want = prefill_and_step(model, {"params": params}, tokens, lengths)
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=2, tensor=2)), jax.devices()[:4])
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), int))["params"]
    with parallel.use_mesh(mesh):
        sharded = jax.device_put(params, parallel.shardings(boxed, mesh))
        got = prefill_and_step(model, {"params": sharded}, tokens, lengths)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5), got, want)
    state = got[2]["decoder"]["layers"]["ssm"]["ssm_state"]  # [layers, B, H, P, N]
    assert state.sharding.shard_shape(state.shape) == (1, 2, 2, 8, 8)


def test_config_checks_name_the_field():
    with pytest.raises(ConfigError, match="model.attention.ssm: the pattern has ssm layers"):
        tiny_model(attention=AttentionConfig(pattern="ssm,global")).validate("model.")
    with pytest.raises(ConfigError, match="model.attention.ssm.conv_width"):
        hybrid(ssm=dataclasses.replace(SSM, conv_width=1)).validate("model.")
    with pytest.raises(ConfigError, match="model.attention.ssm.state_dim"):
        hybrid(ssm=dataclasses.replace(SSM, state_dim=0)).validate("model.")
    with pytest.raises(ConfigError, match="mesh.context: SSM layers"):
        validate(Config(model=hybrid(), mesh=MeshConfig(data=2, context=4)))
    splash = AttentionConfig(pattern="ssm,global", kernel="splash", ssm=SSM)
    validate(Config(model=tiny_model(attention=splash)))  # splash runs the attention layers
    with pytest.raises(ConversionError, match="hybrid model cannot be exported"):
        check_exportable(hybrid(), "llama")


def test_calculator_counts_the_state_in_place_of_the_kv_cache():
    cfg = hybrid("ssm,ssm,ssm,global", num_layers=4)
    s, kv = SSM, 2 * cfg.num_kv_heads * cfg.resolved_head_dim * 4  # float32 K and V per token
    inner = s.num_heads * s.head_dim
    state = inner * s.state_dim * 4 + (s.conv_width - 1) * (inner + 2 * s.state_dim) * 4
    for length in (16, 64):
        assert calculator.kv_cache_bytes(cfg, length) == 3 * state + length * kv
    assert calculator.kv_cache_bytes_per_token(cfg) == kv
    total, _ = calculator.param_counts(cfg)
    e = cfg.embed_dim
    per_layer = (2 * e * inner + 2 * e * s.state_dim + e * s.num_heads  # projections in
                 + (s.conv_width + 1) * (inner + 2 * s.state_dim)  # convs
                 + 3 * s.num_heads + inner * e)  # a_log, dt_bias, d_skip; out
    assert total["ssm"] == 3 * per_layer


@pytest.mark.slow
def test_tiny_hybrid_learns_like_the_tiny_dense_model():
    """tiny_hybrid and tiny_dense pretrain on the reasoning corpus with the same settings;
    the hybrid's loss falls as far as the dense model's does, within 10%."""
    last = {}
    for name in ("tiny_hybrid", "tiny_dense"):
        config = Config(
            model=presets.PRESETS[name](),
            mesh=MeshConfig(data=8),
            train=TrainConfig(steps=40, batch_size=16, seq_len=64, log_every=20, eval_every=0,
                              peak_flops=1e12),
        )
        history = pretrain(config, log=lambda line: None)
        first, last[name] = history[0]["loss"], history[-1]["loss"]
        assert last[name] < 0.4 * first, (name, first, last[name])
    assert last["tiny_hybrid"] < 1.1 * last["tiny_dense"], last
