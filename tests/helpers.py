"""Small shared builders for the tests."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import config as config_lib
from jaxllm import parallel
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


def loss_and_grads(model, params, batch, mesh):
    """Mean loss and gradients of `model` on `batch`, params and batch placed on `mesh` by
    the sharding rules. Returns (loss, grads, the placed params)."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), batch["inputs"][:1])["params"]
    with parallel.use_mesh(mesh):
        params = jax.device_put(params, parallel.shardings(boxed, mesh))
        batch = jax.device_put(batch, parallel.batch_shardings(mesh, batch))

        @jax.jit
        def fn(p, b):
            (_, (nll, tokens)), grads = jax.value_and_grad(
                functools.partial(dense_loss_sums, model=model, z_loss=1e-4), has_aux=True
            )(p, b)
            return nll / tokens, jax.tree.map(lambda g: g / tokens, grads)

        loss, grads = fn(params, batch)
    return loss, grads, params
