"""Evaluation: the mean token loss on a fixed set of validation batches, and its perplexity."""

import functools
import math

import jax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm import parallel
from jaxllm.train.state import TrainState
from jaxllm.train.step import cross_entropy, model_inputs


def eval_sums(params, moe_bias, batch, *, model: nn.Module):
    """(summed masked cross-entropy, masked-in tokens) of one batch; no z-loss, no aux losses."""
    logits = model.apply(
        {"params": params, "moe_bias": moe_bias}, *model_inputs(batch))
    nll, _, tokens = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return nll, tokens


def jit_eval_step(model: nn.Module, mesh: Mesh, state_shardings: TrainState,
                  batch_shardings=None):
    """`eval_sums` under jit on the train state's shardings, the batch laid out as
    `batch_shardings` (default `parallel.batch_sharding`). Call it inside `use_mesh(mesh)`."""
    return jax.jit(
        functools.partial(eval_sums, model=model),
        in_shardings=(
            state_shardings.params, state_shardings.moe_bias,
            batch_shardings or parallel.batch_sharding(mesh),
        ),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )


def evaluate(eval_step, state: TrainState, batches: list[dict]) -> dict[str, float]:
    """Token-weighted mean loss over `batches`, and its exponential, the perplexity."""
    sums = jax.device_get([eval_step(state.params, state.moe_bias, batch) for batch in batches])
    nll = sum(float(n) for n, _ in sums)
    tokens = sum(float(t) for _, t in sums)
    loss = nll / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(loss)}
