"""The jit-compiled, sharded DPO update step, and the per-sequence log-probs it needs.

A batch holds P pairs as 2P rows, chosen rows first (`jaxllm.post.preferences.batch`):

    tokens, positions, segment_ids, response_mask: [2P, S]
    ref_logps: [2P], the reference's summed response log-probs (update steps only)
"""

import functools

import jax
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm import parallel
from jaxllm.config import DPOConfig
from jaxllm.post.dpo_loss import dpo_loss, sequence_logps
from jaxllm.rl.step import token_logprobs
from jaxllm.train import moe
from jaxllm.train.state import TrainState
from jaxllm.train.optimizer import split_trainable, with_frozen
from jaxllm.train.step import apply_gradients

ROW_KEYS = ("tokens", "positions", "segment_ids", "response_mask")


def _forward(params, moe_bias, batch, model: nn.Module):
    """([2P] summed response log-probs, moe_metrics) of the batch's rows under `params`."""
    logits, sown = model.apply(
        {"params": params, "moe_bias": moe_bias}, batch["tokens"], batch["positions"],
        batch["segment_ids"], mutable=["moe_metrics"],
    )
    token_logps, _ = token_logprobs(logits, batch["tokens"])
    return sequence_logps(token_logps, batch["response_mask"]), sown.get("moe_metrics", {})


def response_logps(params, moe_bias, batch, *, model: nn.Module):
    """[2P] summed response log-probs, for the reference model and for evaluation."""
    return _forward(params, moe_bias, batch, model)[0]


def _loss(params, moe_bias, batch, model: nn.Module, cfg: DPOConfig):
    """(DPO loss + MoE aux losses, (metrics, moe_metrics))."""
    logps, moe_metrics = _forward(params, moe_bias, batch, model)
    lengths = batch["response_mask"].sum(-1)
    loss, metrics = dpo_loss(logps, batch["ref_logps"], lengths, cfg)
    return loss + moe.aux_loss(moe_metrics), (metrics, moe_metrics)


def dpo_step(state: TrainState, batch, *, model: nn.Module, tx, cfg: DPOConfig, schedule):
    """One optimizer step on the DPO loss plus the MoE aux losses, for the trainable params
    (with LoRA, the adapters); MoE selection biases then take their aux-loss-free step on
    the batch's load, as in pretraining."""
    trainable, frozen = split_trainable(state.params, model.config)
    loss_fn = with_frozen(functools.partial(_loss, model=model, cfg=cfg), frozen)
    grads, (metrics, moe_metrics) = jax.grad(loss_fn, has_aux=True)(
        trainable, state.moe_bias, batch)
    metrics = {
        **metrics,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "response_tokens": batch["response_mask"].sum(),
        **moe.step_metrics(model.config, moe_metrics, 1),
    }
    return apply_gradients(state, grads, moe_metrics, model=model, tx=tx), metrics


def batch_shardings(mesh: Mesh, keys=ROW_KEYS + ("ref_logps",)) -> dict[str, NamedSharding]:
    """Rows over (data, fsdp); [2P, S] positions over context."""
    per_token = parallel.batch_sharding(mesh)
    per_row = NamedSharding(mesh, PartitionSpec(parallel.BATCH_AXES))
    return {k: per_row if k == "ref_logps" else per_token for k in keys}


def jit_dpo_step(model, tx, cfg: DPOConfig, schedule, mesh: Mesh, state_shardings):
    """`dpo_step` under jit with explicit shardings and the state donated. Call the result
    inside `parallel.use_mesh(mesh)`."""
    step = functools.partial(dpo_step, model=model, tx=tx, cfg=cfg, schedule=schedule)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings(mesh)),
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )


def jit_response_logps(model, mesh: Mesh, state_shardings):
    """`response_logps` under jit: (params, moe_bias, rows) -> [2P], for any state laid out
    like `state_shardings` (the policy, or the frozen reference)."""
    return jax.jit(
        functools.partial(response_logps, model=model),
        in_shardings=(state_shardings.params, state_shardings.moe_bias,
                      batch_shardings(mesh, ROW_KEYS)),
        out_shardings=NamedSharding(mesh, PartitionSpec(parallel.BATCH_AXES)),
    )
