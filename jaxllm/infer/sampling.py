"""Turning next-token logits into tokens: greedy, temperature, top-k and top-p."""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick a token. Temperature 0 is greedy; top-k and top-p (nucleus) then apply
    in that order to the temperature-scaled distribution, as in Hugging Face."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must lie in (0, 1] or be None, got {self.top_p}")


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Temperature-scaled float32 logits [B, V], -inf outside the top-k / top-p set.

    Top-p keeps the smallest set of most likely tokens whose mass reaches p (at least one);
    p = 1 keeps every token, as in Hugging Face (a float32 running sum reaches 1 early).
    """
    logits = logits.astype(jnp.float32) / config.temperature
    top_p = None if config.top_p == 1 else config.top_p
    if config.top_k is None and top_p is None:
        return logits
    order = jnp.argsort(-logits, axis=-1)  # [B, V] most likely first
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    keep = jnp.ones(ranked.shape, bool)
    if config.top_k is not None:
        keep &= jnp.arange(ranked.shape[-1]) < config.top_k
    if top_p is not None:
        probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep &= mass_before < top_p
    ranks = jnp.argsort(order, axis=-1)  # inverse permutation
    return jnp.where(jnp.take_along_axis(keep, ranks, axis=-1), logits, -jnp.inf)


def sample(rng: jax.Array, logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """logits [B, V] -> tokens [B] int32."""
    if config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, config)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
