"""The loss and the jit-compiled train step, with gradient accumulation inside the jit."""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm import parallel
from jaxllm.config import TrainConfig
from jaxllm.train import moe
from jaxllm.train.optimizer import join_trainable, split_trainable, with_frozen
from jaxllm.train.state import TrainState


def cross_entropy(logits, targets, loss_mask, z_loss: float = 0.0):
    """Summed token cross-entropy in float32, plus `z_loss * logsumexp(logits)^2`.

    Returns (sum of masked losses, sum of masked z-losses, number of masked-in tokens);
    the caller divides, so micro-batches combine exactly.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # A one-hot select-and-sum fuses with the cast; a gather would need the float32 logits.
    vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
    target_logits = jnp.where(vocab == targets[..., None], logits, 0.0).sum(axis=-1)
    nll = (log_z - target_logits) * loss_mask
    z_term = z_loss * jnp.square(log_z) * loss_mask
    return nll.sum(), z_term.sum(), loss_mask.sum()


def indexer_loss(attention_metrics) -> jnp.ndarray:
    """The sparse-attention indexers' KL losses summed over layers (0 without any)."""
    leaves = jax.tree.leaves(attention_metrics)
    return sum((x.sum() for x in leaves), jnp.zeros((), jnp.float32))


def model_inputs(batch) -> tuple:
    """The model's positional inputs from a batch: tokens, positions, segment ids, and the
    images (`patches`, and `patch_index` where the tokens are in context order) or None."""
    return (batch["inputs"], batch["positions"], batch["segment_ids"], batch.get("patches"),
            batch.get("patch_index"))


def forward(params, moe_bias, batch, model: nn.Module, fp8_meta=None):
    """(logits, moe_metrics, indexer loss) of one micro-batch (with its images, where it holds
    `patches`); `fp8_meta`, the amax histories of tensorwise fp8 layers, where the caller
    keeps them."""
    fp8 = {"fp8_meta": fp8_meta} if fp8_meta else {}
    logits, sown = model.apply(
        {"params": params, "moe_bias": moe_bias, **fp8},
        *model_inputs(batch), mutable=["moe_metrics", "attention_metrics"],
    )
    return logits, sown.get("moe_metrics", {}), indexer_loss(sown.get("attention_metrics", {}))


def aux_loss(model: nn.Module, moe_metrics, indexer) -> jnp.ndarray:
    """The MoE layers' aux losses plus the weighted sparse-attention indexer losses."""
    sparse = model.config.attention.sparse
    return moe.aux_loss(moe_metrics) + (sparse.loss_weight * indexer if sparse else 0.0)


def loss_sums(params, moe_bias, batch, model: nn.Module, z_loss: float, fp8_meta=None):
    """The train step's loss of one micro-batch, differentiated for params:
    (summed loss, (summed nll, tokens, moe_metrics, indexer loss)).

    The loss is the summed cross-entropy and z-loss, plus the MoE layers' aux losses and the
    weighted sparse-attention indexer losses times the token count, so that dividing by the
    batch's tokens leaves their token-weighted mean.
    """
    logits, moe_metrics, indexer = forward(params, moe_bias, batch, model, fp8_meta)
    aux = aux_loss(model, moe_metrics, indexer)
    nll, z_term, tokens = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
    return nll + z_term + aux * tokens, (nll, tokens, moe_metrics, indexer)


def lm_loss(params, moe_bias, batch, *, model: nn.Module, z_loss: float, fp8_meta=None):
    """`loss_sums` as a train step's loss: its summed nll reported as "loss"."""
    loss, (nll, tokens, moe_metrics, indexer) = loss_sums(params, moe_bias, batch, model, z_loss,
                                                          fp8_meta)
    return loss, ({"loss": nll}, tokens, moe_metrics, indexer)


def _split_micro_batches(batch, k: int):
    """[B, ...] -> [k, B/k, ...], taking rows i, i+k, i+2k, ... into micro-batch i so that
    each device's contiguous shard feeds every micro-batch (no data moves)."""

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "act_batch", "act_length"))

    return jax.tree.map(split, batch)


def _with_fp8_meta(loss):
    """`loss` of ((params, fp8_meta), moe_bias, batch, *frozen): its gradient for the fp8
    amax histories is their next value (`jaxllm.nn.fp8.matmul`). A loss is passed
    `fp8_meta=` only when the model has tensorwise fp8 layers."""

    def wrapped(params_and_meta, moe_bias, batch, *frozen):
        params, fp8_meta = params_and_meta
        meta = {"fp8_meta": fp8_meta} if fp8_meta else {}
        return loss(params, moe_bias, batch, *frozen, **meta)

    return wrapped


def train_step(state: TrainState, batch, *frozen, model: nn.Module, tx, cfg: TrainConfig,
               schedule, loss):
    """One optimizer step over `cfg.grad_accum` micro-batches.

    `loss(params, moe_bias, micro_batch, *frozen)` returns (summed loss, (sums, tokens,
    moe_metrics, indexer loss)), `sums` a dict of token-summed values to report; `frozen` are
    arrays it reads without gradient (a teacher's params). The loss and every reported sum
    are divided by all the masked-in tokens of the whole batch, whatever the number of
    micro-batches, so accumulation is exact. Gradients are taken for the trainable params
    only (`split_trainable`: with LoRA, the adapters). After the update, the MoE selection
    biases take one aux-loss-free step on the whole batch's load. The fp8 amax histories
    (the loss's `fp8_meta=`) take each micro-batch's amax, the largest over the micro-batches.
    """
    trainable, frozen_params = split_trainable(state.params, model.config)
    grad_fn = jax.grad(_with_fp8_meta(with_frozen(loss, frozen_params)), has_aux=True)
    variables = (trainable, state.fp8_meta)

    def accumulate(carry, micro_batch):
        (grads, fp8_meta), sums, tokens, moe_metrics, indexer = carry
        (g, meta), (s, t, m, i) = grad_fn(variables, state.moe_bias, micro_batch, *frozen)
        add = functools.partial(jax.tree.map, jnp.add)
        fp8_meta = jax.tree.map(jnp.maximum, fp8_meta, meta)
        return ((add(grads, g), fp8_meta), add(sums, s), tokens + t, add(moe_metrics, m),
                indexer + i), None

    micro_batches = batch if cfg.grad_accum == 1 else _split_micro_batches(batch, cfg.grad_accum)
    first = batch if cfg.grad_accum == 1 else jax.tree.map(lambda x: x[0], micro_batches)
    sum_shapes, _, moe_shapes, _ = jax.eval_shape(
        grad_fn, variables, state.moe_bias, first, *frozen)[1]
    zeros = jax.tree.map(jnp.zeros_like, variables)
    scalar = jnp.zeros((), jnp.float32)
    sum_zeros, moe_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                        (sum_shapes, moe_shapes))
    init = (zeros, sum_zeros, scalar, moe_zeros, scalar)
    if cfg.grad_accum == 1:
        ((grads, fp8_meta), sums, tokens, moe_metrics, indexer), _ = accumulate(init, batch)
    else:
        ((grads, fp8_meta), sums, tokens, moe_metrics, indexer), _ = jax.lax.scan(
            accumulate, init, micro_batches)
    tokens = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    metrics = {
        **{name: value / tokens for name, value in sums.items()},
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "tokens": tokens,
        **moe.step_metrics(model.config, moe_metrics, cfg.grad_accum),
    }
    if model.config.attention.sparse is not None:
        metrics["indexer_loss"] = indexer / cfg.grad_accum
    state = apply_gradients(state, grads, moe_metrics, model=model, tx=tx)
    return state.replace(fp8_meta=fp8_meta), metrics


def apply_gradients(state: TrainState, grads, moe_metrics, *, model: nn.Module, tx) -> TrainState:
    """The next state: one optimizer update of the trainable params (`grads` is laid out as
    `split_trainable`'s trainable part), then the MoE selection biases' aux-loss-free step
    on the batch's expert load, except under LoRA, which leaves the base model as it is.
    The fp8 amax histories stay as they are."""
    trainable, frozen = split_trainable(state.params, model.config)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = join_trainable(optax.apply_updates(trainable, updates), frozen)
    moe_config = model.config.moe
    base_trains = model.config.active_lora is None
    rate = moe_config.bias_update_rate if moe_config and base_trains else 0.0
    moe_bias = moe.update_biases(state.moe_bias, moe_metrics, rate)
    _, rng = jax.random.split(state.rng)
    return TrainState(state.step + 1, params, opt_state, rng, moe_bias, state.fp8_meta)


def jit_train_step(model, tx, cfg: TrainConfig, schedule, mesh: Mesh, state_shardings, *,
                   loss=None, frozen_shardings=(), batch_shardings=None):
    """`train_step` under jit with explicit shardings and the state donated:
    `step(state, batch, *frozen)`, `frozen` laid out as `frozen_shardings`.

    `loss` defaults to the language-model loss (`lm_loss`). `batch_shardings` lays out the
    batch (default: every array as `parallel.batch_sharding`; a batch with images takes
    `parallel.batch_shardings`). Call the result inside `parallel.use_mesh(mesh)`.
    """
    loss = loss or functools.partial(lm_loss, model=model, z_loss=cfg.z_loss)
    step = functools.partial(train_step, model=model, tx=tx, cfg=cfg, schedule=schedule,
                             loss=loss)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings or parallel.batch_sharding(mesh),
                      *frozen_shardings),
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
