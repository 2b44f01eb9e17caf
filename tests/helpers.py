"""Small shared builders for the tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import config as config_lib
from jaxllm.data import ArithmeticSource
from jaxllm.train.step import loss_sums


def tiny_model(**overrides) -> config_lib.ModelConfig:
    base = dict(
        vocab_size=384, embed_dim=64, num_layers=2, num_heads=8, num_kv_heads=4, mlp_dim=128
    )
    return config_lib.ModelConfig(**{**base, **overrides})


def arithmetic_batch(batch_size: int = 8, seq_len: int = 32, seed: int = 0) -> dict:
    source = ArithmeticSource(seed)
    return {k: jnp.asarray(v) for k, v in next(source.batches(batch_size, seq_len)).items()}


def abstract_params(model: nn.Module, seq_len: int = 8):
    """Param shapes without allocating anything (through `jax.eval_shape`)."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])


def dense_loss_sums(params, batch, model: nn.Module, z_loss: float):
    """The train step's `loss_sums` without MoE selection biases: (summed loss, (summed nll,
    tokens))."""
    loss, (nll, tokens, *_) = loss_sums(params, {}, batch, model, z_loss)
    return loss, (nll, tokens)


def init_params(model: nn.Module, seq_len: int = 16, seed: int = 0):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    init = jax.jit(lambda key: nn.meta.unbox(model.init(key, tokens)["params"]))
    return init(jax.random.key(seed))
