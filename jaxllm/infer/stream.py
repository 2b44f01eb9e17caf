"""Token-by-token generation of one prompt, for interactive output.

The same prefill, sampling and effort forcing as `sampler.generate`, but the decode loop
runs in Python around one jitted step, so each token can be shown as soon as it exists.
With a toolbox, a `</tool>` runs the call and its `<result>...</result>` tokens are fed
into the cache and yielded too (`jaxllm.infer.tool_use`).
"""

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.infer import effort as effort_lib
from jaxllm.infer.cache import decode_step, prefill
from jaxllm.infer.sampler import Sampler
from jaxllm.infer.sampling import SamplingConfig, sample
from jaxllm.infer.tool_use import ToolTokens, result_tokens, run_call
from jaxllm.tools import Toolbox


_prefill = jax.jit(prefill, static_argnums=(0, 4))
_feed = jax.jit(decode_step, static_argnums=0)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "think"))
def _next(variables, cache, logits, rng, position, effort_state, limits, *, model, sampling,
          think):
    token = sample(rng, logits, sampling)
    if effort_state is not None:
        token, effort_state = effort_lib.force(effort_state, token, *limits, think)
    logits, cache = decode_step(model, variables, cache, token, position)
    return token, logits, cache, effort_state


def stream(
    sampler: Sampler,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    effort: str | effort_lib.Effort | None = None,
    toolbox: Toolbox | None = None,
    max_calls: int = 4,
    patches: jax.Array | None = None,
) -> Iterator[int]:
    """Yields the generated token ids one at a time, up to and including a stop token
    (`</answer>` or `<eos>`). With an `effort`, `prompt` should end with `<think>`. With a
    `toolbox` (not with an effort), up to `max_calls` calls run and their results are
    yielded; `max_new_tokens` counts them. `patches` [1, P, patch_dim] are the images of
    the prompt's `<patch>` tokens, read by the prefill."""
    if toolbox is not None and effort is not None:
        raise ValueError("effort: budget forcing does not combine with tools")
    model, tokenizer = sampler.model, sampler.tokenizer
    variables = {"params": sampler.params}
    if sampler.moe_bias is not None:
        variables["moe_bias"] = sampler.moe_bias
    tokens = jnp.asarray([prompt], jnp.int32)
    length = jnp.asarray([len(prompt)], jnp.int32)
    logits, cache = _prefill(model, variables, tokens, length, len(prompt) + max_new_tokens,
                             patches)
    state, limits = None, None
    if effort is not None:
        chosen = effort_lib.resolve(effort, sampler.efforts)
        state = effort_lib.init_state(tokens[:, -1], sampler.think)
        limits = (np.int32(chosen.budget), np.int32(chosen.num_waits))
    stops = {tokenizer.special.get("</answer>"), tokenizer.eos_id}
    sampling = SamplingConfig(temperature, top_k, top_p)
    marks = None if toolbox is None else ToolTokens.from_tokenizer(tokenizer)
    generated, calls = [], 0
    while len(generated) < max_new_tokens:
        step = len(generated)
        token, logits, cache, state = _next(
            variables, cache, logits, jax.random.fold_in(rng, step), length + step, state,
            limits, model=model, sampling=sampling, think=sampler.think,
        )
        generated.append(int(token[0]))
        yield generated[-1]
        if generated[-1] in stops:
            return
        if marks is not None and generated[-1] == marks.close:
            _, output = run_call(toolbox, tokenizer, generated, marks, calls_before=calls,
                                 max_calls=max_calls)
            calls += 1
            for fed in result_tokens(output, tokenizer, marks)[:max_new_tokens - len(generated)]:
                logits, cache = _feed(model, variables, cache, jnp.asarray([fed], jnp.int32),
                                      length + len(generated))
                generated.append(fed)
                yield fed
