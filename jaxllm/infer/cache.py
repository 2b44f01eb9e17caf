"""The KV cache of a decoding model: its layout, prefill and one decode step.

Prompts are left-padded into slots 0 .. P-1 of the cache, so every row writes its next
token to the same slot; each row's positions start at 0 on its first real token. The cache
itself is the model's "cache" collection: each attention layer owns the variables of its
own layout, stacked over a leading layers axis where the decoder is scanned:

- MHA/GQA/MQA: `cached_key`, `cached_value` [B, L, K, D] and `cache_index`;
- sliding-window layers: a ring of `window` slots, plus `cached_positions`;
- MLA: the latent `cached_latent` [B, L, kv_lora_rank] and `cached_rope_key`;
- DeepSeek sparse attention: the indexer's own `cached_key` besides the layer's;
- Mamba-2 layers (`ssm`): no slots but a fixed state, `ssm_state` and each conv's
  `history` (`jaxllm.nn.ssm`).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def decoding(model: nn.Module) -> nn.Module:
    """The same model (same parameters) with `decode=True`."""
    return model if model.decode else model.clone(decode=True)


def init_cache(model: nn.Module, batch_size: int, cache_len: int) -> dict:
    """A zero "cache" collection with `cache_len` slots per row; nothing is computed."""
    tokens = jnp.zeros((batch_size, cache_len), jnp.int32)
    shapes = jax.eval_shape(lambda: decoding(model).init(jax.random.key(0), tokens)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Token lists -> (tokens [B, P] int32, left-padded; lengths [B] int32).

    P is `length`, or the longest prompt when None.
    """
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() == 0:
        raise ValueError("prompts: need at least one prompt, each of at least one token")
    width = int(lengths.max()) if length is None else length
    if lengths.max() > width:
        raise ValueError(f"prompt_len: {width} is shorter than the longest prompt, {lengths.max()}")
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
    return tokens, lengths


def _apply(model, variables, cache, tokens, positions, patches=None):
    logits, updated = decoding(model).apply(
        {**variables, "cache": cache}, tokens, positions, patches=patches, mutable=["cache"]
    )
    return logits, updated["cache"]


def prefill(model, variables, tokens, lengths, cache_len: int, patches=None):
    """Runs left-padded prompts [B, P] (`lengths` [B]) through a fresh cache of `cache_len`
    slots, with the images of their `<patch>` tokens `patches` (`Transformer`), if any.
    Returns (logits [B, V] for the token after each prompt, cache)."""
    batch, width = tokens.shape
    positions = jnp.maximum(jnp.arange(width) - (width - lengths)[:, None], 0)
    cache = init_cache(model, batch, cache_len)
    logits, cache = _apply(model, variables, cache, tokens, positions, patches)
    return logits[:, -1], cache


def decode_step(model, variables, cache, tokens, positions):
    """Appends one token per row (`tokens`, `positions` [B]) to the cache.

    Returns (logits [B, V] for the next token, cache).
    """
    logits, cache = _apply(model, variables, cache, tokens[:, None], positions[:, None])
    return logits[:, 0], cache
