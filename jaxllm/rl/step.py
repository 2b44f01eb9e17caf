"""The jit-compiled, sharded GRPO update step.

A batch holds B whole sequences (prompt + completion), each [B, S] array aligned with
`tokens`: `logprobs[b, t]` is log p(tokens[b, t] | tokens[b, :t]), 0 at t = 0, and
`completion_mask` is 1 on the completion tokens whose log-probs count.

    tokens, positions, segment_ids, completion_mask: [B, S]
    advantages: [B]
    sampler_logprobs: [B, S], the rollout sampler's log-probs of the tokens (`Rollout`),
        for the off-policy importance weights (`jaxllm.rl.importance`)
    old_logprobs: [B, S], when grpo.num_iterations > 1 (with mu = 1, pi_old is the
        policy itself under stop_gradient, so the ratio is exactly 1)
    ref_logprobs: [B, S], when grpo.beta > 0
    patches: [B, P, patch_dim], the images of the rows' `<patch>` tokens, with `images=True`

The mu inner iterations are the caller's loop over this step.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm import parallel
from jaxllm.config import GRPOConfig
from jaxllm.rl.importance import importance_weights, off_policy_sequence_mask
from jaxllm.rl.loss import grpo_loss
from jaxllm.train import moe
from jaxllm.train.optimizer import split_trainable, with_frozen
from jaxllm.train.state import TrainState
from jaxllm.train.step import apply_gradients


def token_logprobs(logits, tokens, temperature: float = 1.0):
    """Log-probs of the realised tokens, and the predictive entropy, in float32, of the
    distribution softmax(logits / temperature).

    logits [B, S, V] predict the next token; returns (logprobs, entropy), both [B, S],
    aligned with `tokens` (position t holds the prediction of token t; 0 at t = 0).
    """
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
    chosen = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    entropy = -(jnp.exp(log_probs) * log_probs).sum(-1)
    pad = jnp.zeros((tokens.shape[0], 1), jnp.float32)
    return jnp.concatenate([pad, chosen], 1), jnp.concatenate([pad, entropy], 1)


def _forward(params, moe_bias, tokens, positions, segment_ids, model: nn.Module, patches=None,
             temperature: float = 1.0):
    """(logprobs, entropy, moe_metrics) of `tokens` (and their images `patches`, or None)
    under `params`, at the sampling `temperature`."""
    logits, sown = model.apply(
        {"params": params, "moe_bias": moe_bias}, tokens, positions, segment_ids, patches,
        mutable=["moe_metrics"],
    )
    logprobs, entropy = token_logprobs(logits, tokens, temperature)
    return logprobs, entropy, sown.get("moe_metrics", {})


def logprobs(params, moe_bias, tokens, positions, segment_ids, patches=None, *,
             model: nn.Module, temperature: float = 1.0):
    """[B, S] log-probs of `tokens` (with their images `patches`, or None) at the sampling
    `temperature`, for pi_old (mu > 1) or the reference model."""
    return _forward(params, moe_bias, tokens, positions, segment_ids, model, patches,
                    temperature)[0]


def _loss(params, moe_bias, batch, model: nn.Module, cfg: GRPOConfig):
    """(GRPO loss + MoE aux losses, (GRPO loss, metrics, moe_metrics))."""
    logp, entropy, moe_metrics = _forward(
        params, moe_bias, batch["tokens"], batch["positions"], batch["segment_ids"], model,
        batch.get("patches"), cfg.temperature,
    )
    old = batch["old_logprobs"] if cfg.num_iterations > 1 else jax.lax.stop_gradient(logp)
    mask = batch["completion_mask"].astype(jnp.float32)
    weights, offpolicy = importance_weights(old, batch["sampler_logprobs"], mask,
                                            mode=cfg.importance_sampling,
                                            cap=cfg.importance_sampling_cap)
    if cfg.off_policy_mask_threshold is not None:
        keep, masked = off_policy_sequence_mask(logp, batch["sampler_logprobs"],
                                                batch["advantages"], mask,
                                                threshold=cfg.off_policy_mask_threshold)
        weights, offpolicy = weights * keep, offpolicy | masked
    loss, metrics = grpo_loss(
        logp, old, batch["advantages"], mask, cfg, batch.get("ref_logprobs"), weights
    )
    metrics.update(offpolicy)
    metrics["entropy"] = (entropy * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    return loss + moe.aux_loss(moe_metrics), (loss, metrics, moe_metrics)


def grpo_step(state: TrainState, batch, *, model: nn.Module, tx, cfg: GRPOConfig, schedule):
    """One optimizer step on the GRPO loss, plus the MoE aux losses at their configured
    weights, for the trainable params (with LoRA, the adapters); MoE selection biases then
    take their aux-loss-free step on the batch's load, as in pretraining."""
    trainable, frozen = split_trainable(state.params, model.config)
    loss_fn = with_frozen(functools.partial(_loss, model=model, cfg=cfg), frozen)
    grads, (loss, metrics, moe_metrics) = jax.grad(loss_fn, has_aux=True)(
        trainable, state.moe_bias, batch)
    metrics = {
        "loss": loss,
        **metrics,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "completion_tokens": batch["completion_mask"].sum(),
        **moe.step_metrics(model.config, moe_metrics, 1),
    }
    return apply_gradients(state, grads, moe_metrics, model=model, tx=tx), metrics


def batch_keys(cfg: GRPOConfig, images: bool = False) -> tuple[str, ...]:
    """The arrays a GRPO batch must hold under `cfg`; `images`: its rows' `patches` too."""
    keys = ("tokens", "positions", "segment_ids", "completion_mask", "advantages",
            "sampler_logprobs")
    keys += ("old_logprobs",) if cfg.num_iterations > 1 else ()
    keys += ("patches",) if images else ()
    return keys + (("ref_logprobs",) if cfg.beta > 0 else ())


def batch_shardings(mesh: Mesh, cfg: GRPOConfig, images: bool = False
                    ) -> dict[str, NamedSharding]:
    """Sequences over (data, fsdp); [B, S] positions over context; each row's patches whole."""
    per_sequence = NamedSharding(mesh, PartitionSpec(parallel.BATCH_AXES))
    return {**parallel.batch_shardings(mesh, batch_keys(cfg, images)),
            "advantages": per_sequence}


def jit_grpo_step(model, tx, cfg: GRPOConfig, schedule, mesh: Mesh, state_shardings, *,
                  images: bool = False):
    """`grpo_step` under jit with explicit shardings and the state donated.

    The batch must hold exactly `batch_keys(cfg, images)`. Call the result inside
    `parallel.use_mesh(mesh)`.
    """
    step = functools.partial(grpo_step, model=model, tx=tx, cfg=cfg, schedule=schedule)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings(mesh, cfg, images)),
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )


def jit_logprobs(model, mesh: Mesh, state_shardings, *, images: bool = False,
                 temperature: float = 1.0):
    """`logprobs` at `temperature` under jit: (params, moe_bias, tokens, positions,
    segment_ids) -> [B, S], for any state laid out like `state_shardings` (the policy, or a
    frozen reference copy); `images`: the rows' `patches` follow segment_ids."""
    per_token = parallel.batch_sharding(mesh)
    return jax.jit(
        functools.partial(logprobs, model=model, temperature=temperature),
        in_shardings=(state_shardings.params, state_shardings.moe_bias)
        + (per_token,) * (4 if images else 3),
        out_shardings=per_token,
    )
