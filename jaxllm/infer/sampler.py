"""Batched generation with a KV cache: one jitted prefill and decode loop.

The loop is a `lax.while_loop` that stops as soon as every row has emitted a stop token
(or after `max_new_tokens`). GRPO samples G completions of a prompt by repeating it G times.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxllm.infer import effort as effort_lib
from jaxllm.infer.cache import decode_step, left_pad, prefill
from jaxllm.infer.sampling import SamplingConfig, sample


@flax.struct.dataclass
class GenerationResult:
    """What `generate` returns, per row of the batch.

    tokens: [B, N] generated tokens, `pad_id` after a row's end.
    logprobs: [B, N] float32 log pi(token | prefix) under the model's distribution at the
      sampling temperature (1 when greedy), before top-k/top-p filtering and effort forcing
      (forced tokens get the model's log-prob of the forced token); 0 after a row's end.
    lengths: [B] tokens generated, including the stop token that ended the row.
    """

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array


@flax.struct.dataclass
class _Loop:
    step: jax.Array
    logits: jax.Array  # [B, V] for the token at `step`
    cache: dict
    result: GenerationResult
    finished: jax.Array  # [B]
    effort: effort_lib.EffortState | None


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "think"))
def _generate(
    variables, prompts, prompt_lengths, rng, stop_ids, pad_id, effort, budgets, patches, *,
    model, max_new_tokens, sampling, think,
):
    """The jitted loop. `stop_ids` [n], `pad_id`, `effort`, ([B] budgets, [B] num_waits) or
    None, and the per-row token `budgets` [B] are traced, so changing their values does not
    recompile. The prompts' images `patches` (or None) enter the prefill only."""
    batch, prompt_len = prompts.shape
    logprob_temperature = sampling.temperature or 1.0  # greedy: the model's own distribution
    logits, cache = prefill(model, variables, prompts, prompt_lengths,
                            prompt_len + max_new_tokens, patches)
    result = GenerationResult(
        jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((batch, max_new_tokens), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
    )
    effort_state = None if effort is None else effort_lib.init_state(prompts[:, -1], think)
    finished = budgets <= 0
    start = _Loop(jnp.zeros((), jnp.int32), logits, cache, result, finished, effort_state)

    def body(loop: _Loop) -> _Loop:
        token = sample(jax.random.fold_in(rng, loop.step), loop.logits, sampling)
        effort_state = loop.effort
        if effort is not None:
            token, effort_state = effort_lib.force(effort_state, token, *effort, think)
        logprob = jnp.take_along_axis(
            jax.nn.log_softmax(loop.logits.astype(jnp.float32) / logprob_temperature),
            token[:, None], axis=-1,
        )[:, 0]
        live = ~loop.finished
        token = jnp.where(live, token, pad_id)
        r = loop.result
        result = GenerationResult(
            r.tokens.at[:, loop.step].set(token),
            r.logprobs.at[:, loop.step].set(jnp.where(live, logprob, 0.0)),
            r.lengths + live,
        )
        finished = loop.finished | jnp.isin(token, stop_ids) | (result.lengths >= budgets)
        positions = prompt_lengths + loop.step
        logits, cache = decode_step(model, variables, loop.cache, token, positions)
        return _Loop(loop.step + 1, logits, cache, result, finished, effort_state)

    def running(loop: _Loop) -> jax.Array:
        return (loop.step < max_new_tokens) & ~jnp.all(loop.finished)

    return jax.lax.while_loop(running, body, start).result


def generate(
    model: nn.Module,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    rng: jax.Array | None = None,
    moe_bias=None,
    effort: effort_lib.Effort | Sequence[effort_lib.Effort] | None = None,
    think: effort_lib.ThinkTokens | None = None,
    pad_id: int = 0,
    prompt_len: int | None = None,
    budgets: Sequence[int] | None = None,
    patches: jax.Array | None = None,
) -> GenerationResult:
    """Samples up to `max_new_tokens` tokens after each prompt.

    Args:
      model: a `Transformer` (any module with a `decode` attribute and a "cache" collection).
      params, moe_bias: its "params" and, for a sigmoid-router MoE, "moe_bias" collections.
      prompts: B token lists of any lengths >= 1; they are left-padded to `prompt_len`
        (default: the longest). It compiles once per batch size, prompt_len,
        max_new_tokens, sampling settings and effort-or-not; the values of stop_ids,
        pad_id and the effort budgets are traced.
      temperature, top_k, top_p: see `SamplingConfig`; temperature 0 is greedy.
      stop_ids: tokens that end a row (the stop token is kept and counted).
      rng: the key for sampling; required unless greedy.
      effort, think: budget forcing of thoughts (`jaxllm.infer.effort`); both or neither.
        `effort` is one `Effort` for every row, or B of them, one per row.
      pad_id: the token that pads prompts and ended rows.
      budgets: at most this many tokens for each row (traced; default max_new_tokens).
      patches: [B, P, patch_dim] the images of the prompts' `<patch>` tokens, for a model
        with `model.vision.image_size` > 0 (`Transformer`); the prefill reads them, and the
        generated tokens are text.

    Run it under `parallel.use_mesh(mesh)` to shard the batch and the cache on the mesh.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    sampling = SamplingConfig(temperature, top_k, top_p)
    if rng is None:
        if temperature > 0:
            raise ValueError("rng: a key is required when temperature > 0")
        rng = jax.random.key(0)
    if (effort is None) != (think is None):
        raise ValueError("effort, think: budget forcing needs both, or neither")
    tokens, lengths = left_pad(prompts, pad_id, prompt_len)
    variables = {"params": params} | ({"moe_bias": moe_bias} if moe_bias is not None else {})
    stop = np.array(tuple(stop_ids) or (-1,), np.int32)  # -1 matches no token
    limits = None if effort is None else effort_lib.per_row(effort, len(tokens))
    budgets = np.full(len(prompts), max_new_tokens, np.int32) if budgets is None else budgets
    return _generate(
        variables, tokens, lengths, rng, stop, np.int32(pad_id), limits,
        np.asarray(budgets, np.int32), patches,
        model=model, max_new_tokens=max_new_tokens, sampling=sampling, think=think,
    )


def to_host(result: GenerationResult) -> GenerationResult:
    """`result` as NumPy arrays, whole on every process, also when its rows span several.
    A result already in NumPy arrays (e.g. of `generate_with_tools`) is returned as it is."""
    on_host = all(isinstance(x, np.ndarray) for x in jax.tree.leaves(result))
    if jax.process_count() == 1 or on_host:
        return jax.device_get(result)
    return multihost_utils.process_allgather(result, tiled=True)


class Sampler:
    """A model, its variables and a tokenizer, for generating from text.

    `generate` takes token lists; `complete` takes and returns text, and with an `effort`
    opens a thought (`<think>`) after each prompt and budget-forces it.
    """

    def __init__(self, model: nn.Module, params, tokenizer, *, moe_bias=None,
                 efforts: dict[str, effort_lib.Effort] = effort_lib.EFFORTS, wait_text=" Wait"):
        self.model, self.params, self.moe_bias = model, params, moe_bias
        self.tokenizer = tokenizer
        self.efforts = efforts
        thinks = {"<think>", "</think>"} <= tokenizer.special.keys()
        self.think = effort_lib.ThinkTokens.from_tokenizer(tokenizer, wait_text) if thinks else None

    def generate(self, prompts: Sequence[Sequence[int]], **kwargs) -> GenerationResult:
        """`generate` with this sampler's model (images included: `patches=`); stops at
        `<eos>` unless `stop_ids` is given."""
        kwargs.setdefault("stop_ids", (self.tokenizer.eos_id,))
        kwargs.setdefault("pad_id", self.tokenizer.pad_id)
        return generate(self.model, self.params, prompts, moe_bias=self.moe_bias, **kwargs)

    def complete(self, texts: Sequence[str], *, effort: str | effort_lib.Effort | None = None,
                 **kwargs) -> list[str]:
        """The decoded completion of each text, up to and including its stop token."""
        prompts = [self.tokenizer.encode(text) for text in texts]
        if effort is not None:
            if self.think is None:
                raise ValueError("effort: the vocabulary has no <think> and </think> tokens")
            prompts = [p + [self.think.open] for p in prompts]
            kwargs.update(effort=effort_lib.resolve(effort, self.efforts), think=self.think)
        result = to_host(self.generate(prompts, **kwargs))
        return [
            self.tokenizer.decode(row[:length])
            for row, length in zip(result.tokens, result.lengths)
        ]
