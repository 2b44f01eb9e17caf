"""The train state, created directly in its sharded layout."""

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxllm import parallel
from jaxllm.train.optimizer import split_trainable


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    # The "moe_bias" collection: MoE selection biases, updated outside the optimizer.
    moe_bias: dict = flax.struct.field(default_factory=dict)
    # The "fp8_meta" collection: tensorwise fp8 amax histories, the train step's to update.
    fp8_meta: dict = flax.struct.field(default_factory=dict)


def _create(rng, *, model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
    init_rng, rng = jax.random.split(rng)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = model.init(init_rng, tokens)
    params = variables["params"]
    opt_state = tx.init(split_trainable(params, model.config)[0])
    return TrainState(
        jnp.zeros((), jnp.int32), params, opt_state, rng, variables.get("moe_bias", {}),
        variables.get("fp8_meta", {}),
    )


def init_state(model, tx, seq_len: int, mesh: Mesh, rng: jax.Array):
    """Initialises params and optimizer state under jit with sharded outputs.

    No full copy ever lands on one device: each device computes only its own shards.
    Returns (state, state_shardings).
    """
    create = functools.partial(_create, model=model, tx=tx, seq_len=seq_len)
    with parallel.use_mesh(mesh):
        boxed = jax.eval_shape(create, rng)
        state_shardings = parallel.shardings(boxed, mesh)
        state = jax.jit(
            lambda r: nn.meta.unbox(create(r)), out_shardings=state_shardings
        )(rng)
    return state, state_shardings


def abstract_state(model, tx, seq_len: int, mesh: Mesh) -> TrainState:
    """The shapes, dtypes and shardings of the state `init_state` makes, computing nothing:
    a target to restore a checkpoint into."""
    create = functools.partial(_create, model=model, tx=tx, seq_len=seq_len)
    # Traced, not eager: under a mesh of TPU topology devices without a TPU attached (ahead-
    # of-time compilation), an eager op would be placed on a device that cannot run it.
    rng = jax.eval_shape(jax.random.key, 0)
    with parallel.use_mesh(mesh):
        boxed = jax.eval_shape(create, rng)
        state_shardings = parallel.shardings(boxed, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.meta.unbox(boxed), state_shardings)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
