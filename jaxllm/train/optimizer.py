"""AdamW with warmup + cosine decay, global-norm clipping, and no decay on norms or biases;
which parameters it trains: all of them, or with LoRA only the adapters."""

import jax
import optax

from jaxllm.config import ModelConfig, TrainConfig
from jaxllm.nn import lora as lora_lib

# Norm scales, biases, and the per-head decay, step bias and skip of SSM layers.
NO_DECAY = frozenset({"scale", "bias", "a_log", "dt_bias", "d_skip"})


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `min_lr_ratio` of it.

    A warmup longer than the run (a short smoke run of a longer experiment) is cut to it.
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=min(cfg.warmup_steps, cfg.steps - 1),
        decay_steps=cfg.steps,
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def decay_mask(params):
    """True for every parameter except norm scales, biases and the SSM per-head scalars."""

    def keep(path, _):
        return not any(getattr(key, "key", None) in NO_DECAY for key in path)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW after clipping the global gradient norm to `grad_clip` (0: no clipping)."""
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
    return optax.chain(
        clip,
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )


def split_trainable(params, model: ModelConfig) -> tuple[dict, dict]:
    """(trainable, frozen) parts of `params`: with `model.lora` the adapters and the base
    weights, else all of `params` and nothing. The optimizer sees only the trainable part,
    so it keeps no moments for frozen weights, and gradients are taken for it alone."""
    if model.active_lora is None:
        return params, {}
    return lora_lib.split(params)


def join_trainable(trainable, frozen) -> dict:
    """The params tree of `split_trainable`'s two parts."""
    return lora_lib.join(trainable, frozen) if frozen else trainable


def with_frozen(fn, frozen):
    """`fn(params, *args)` as a function of the trainable part: fn(trainable, *args)."""

    def of_trainable(trainable, *args, **kwargs):
        return fn(join_trainable(trainable, frozen), *args, **kwargs)

    return of_trainable
