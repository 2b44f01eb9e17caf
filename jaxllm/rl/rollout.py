"""Rollouts: G sampled completions per prompt, laid out as one GRPO update batch.

A row is the prompt followed by its completion, then padding: [B, P + W] tokens, P the
longest prompt, with positions equal to the column (as the sampler's cache has them, so that
chunked and strided masks, which look at a token's index in the row, see what the sampler
saw), segment id 1 on real tokens (0 on padding), and `completion_mask` 1 on the completion
tokens the loss counts. W is the
longest completion rounded up to a multiple of `WIDTH_STEP` (at most the sampling budget),
so the update computes no columns past it and compiles for only a few widths. With a
`ToolSampler`, the `<result>...</result>` tokens tools wrote have `completion_mask` 0.
`sampler_logprobs` holds the sampler's log-probs of the completion tokens, for the update's
off-policy correction (`jaxllm.rl.importance`). Image problems' rows carry their prompt's
`patches` [B, g*g, patch_dim] (`jaxllm.rl.visual`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.data import tasks
from jaxllm.data.tokenizer import chat_prompt
from jaxllm.infer import Sampler
from jaxllm.infer import effort as effort_lib
from jaxllm.infer.sampler import to_host
from jaxllm.infer.tool_use import ToolResult, ToolSampler
from jaxllm.rl import visual
from jaxllm.tools import Toolbox

WIDTH_STEP = 16


def prompt_tokens(problem: tasks.Problem, tokenizer, effort: str | None = None, *,
                  patch_size: int | None = None) -> list[int]:
    """`<bos>` and the task's prompt, or the prompt through the tokenizer's chat template
    (`chat_prompt`), then the control token `<effort:LEVEL>` of an `effort` level, then
    `<think>` if the vocabulary has it: the model continues with its reasoning. An image
    problem's prompt holds its picture's span of `patch_size` patches
    (`visual.image_prompt`)."""
    think = [tokenizer.special["<think>"]] if "<think>" in tokenizer.special else []
    control = []
    if effort is not None:
        token = effort_lib.control_token(effort)
        if token not in tokenizer.special:
            raise ValueError(f"effort: the vocabulary has no control token {token}")
        control = [tokenizer.special[token]]
    if visual.is_image(problem):
        if patch_size is None:
            raise ValueError("patch_size: an image problem's prompt needs the model's patch size")
        return visual.image_prompt(problem, tokenizer, patch_size) + control + think
    return chat_prompt(tokenizer, tasks.prompt(problem)) + control + think


def stop_ids(tokenizer) -> tuple[int, ...]:
    """A completion ends with `</answer>` (where it is one token), or with `<eos>`."""
    answer = tokenizer.special.get("</answer>")
    return (tokenizer.eos_id,) if answer is None else (answer, tokenizer.eos_id)


def rollout_sampler(model, params, tokenizer, *, moe_bias=None, dtype: str | None = None,
                    toolbox: Toolbox | None = None, max_tool_calls: int = 4, **options) -> Sampler:
    """A sampler of `model` that computes in `dtype` (`grpo.rollout_dtype`; None: the model's
    own), its floating params cast to it, as an inference engine in that precision would;
    `moe_bias` stays. With a `toolbox`, a `ToolSampler` that lets the model call its tools.
    `options` go to the sampler (e.g. `efforts`)."""
    if dtype is not None:
        model = model.clone(config=dataclasses.replace(model.config, dtype=dtype))
        params = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    if toolbox is None:
        return Sampler(model, params, tokenizer, moe_bias=moe_bias, **options)
    return ToolSampler(model, params, tokenizer, moe_bias=moe_bias, toolbox=toolbox,
                       max_calls=max_tool_calls, **options)


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One batch of completions, G consecutive rows per prompt (numpy arrays)."""

    tokens: np.ndarray  # [B, P + W]
    positions: np.ndarray  # [B, P + W]
    segment_ids: np.ndarray  # [B, P + W]
    completion_mask: np.ndarray  # [B, P + W]
    sampler_logprobs: np.ndarray  # [B, P + W] float32, 0 off the completion
    lengths: np.ndarray  # [B] completion tokens, the stop token included
    prompts: list[str]  # [B] prompt texts
    completions: list[str]  # [B] completion texts, the stop token included
    tool_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # tool_metrics()
    efforts: list[str] | None = None  # [B] effort levels, when sampled with efforts
    patches: np.ndarray | None = None  # [B, g*g, patch_dim] the prompts' images, if any

    def batch(self) -> dict[str, np.ndarray]:
        """The arrays of a GRPO update batch (advantages and the trainer's log-probs are
        added later); `patches` with image prompts."""
        images = {} if self.patches is None else {"patches": self.patches}
        return {
            **images,
            "tokens": self.tokens,
            "positions": self.positions,
            "segment_ids": self.segment_ids,
            "completion_mask": self.completion_mask,
            "sampler_logprobs": self.sampler_logprobs,
        }


def rollout(
    sampler: Sampler,
    problems: list[tasks.Problem],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    rng: jax.Array,
    prompt_len: int | None = None,
    efforts: list[str] | None = None,
) -> Rollout:
    """Samples `group_size` completions of each problem's prompt; with `efforts` (a level
    per problem), each prompt carries its level's control token and its group is
    budget-forced at that level of `sampler.efforts`. Image problems' prompts carry their
    pictures (`patches`) into the sampler's prefill and the rollout."""
    tokenizer, patch_size = sampler.tokenizer, visual.patch_size_of(sampler)
    levels = [None] * len(problems) if efforts is None else efforts
    prompts = [prompt_tokens(p, tokenizer, level, patch_size=patch_size)
               for p, level in zip(problems, levels, strict=True) for _ in range(group_size)]
    rows = None if efforts is None else [level for level in efforts for _ in range(group_size)]
    options = {}  # budget forcing, images
    if rows is not None:
        options = {"effort": [effort_lib.resolve(r, sampler.efforts) for r in rows],
                   "think": sampler.think}
    patches = visual.prompt_patches(problems, patch_size)
    if patches is not None:
        patches = options["patches"] = np.repeat(patches, group_size, axis=0)
    prompt_len = prompt_len or max(len(p) for p in prompts)
    result = to_host(sampler.generate(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, rng=rng,
        stop_ids=stop_ids(tokenizer), prompt_len=prompt_len, **options,
    ))
    used = min(max_new_tokens, -(-int(result.lengths.max()) // WIDTH_STEP) * WIDTH_STEP)
    width = prompt_len + used
    sampled = (result.tool_mask == 0 if isinstance(result, ToolResult)
               else np.ones(result.tokens.shape, bool))  # not written by a tool
    tokens = np.full((len(prompts), width), tokenizer.pad_id, np.int32)
    real, completion = np.zeros(tokens.shape, bool), np.zeros(tokens.shape, bool)
    sampler_logprobs = np.zeros(tokens.shape, np.float32)
    for row, prompt in enumerate(prompts):
        start, end = len(prompt), len(prompt) + result.lengths[row]
        tokens[row, :start + used] = [*prompt, *result.tokens[row, :used]]
        sampler_logprobs[row, start:start + used] = result.logprobs[row, :used]
        real[row, :end] = True
        completion[row, start:end] = sampled[row, :end - start]
    return Rollout(
        tokens=tokens,
        positions=np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape).copy(),
        segment_ids=real.astype(np.int32),
        completion_mask=completion.astype(np.int32),
        sampler_logprobs=sampler_logprobs,
        lengths=np.asarray(result.lengths),
        prompts=[tokenizer.decode(p) for p in prompts],
        completions=[
            tokenizer.decode(row[:length]) for row, length in zip(result.tokens, result.lengths)
        ],
        tool_metrics=tool_metrics(result) if isinstance(result, ToolResult) else {},
        efforts=rows,
        patches=patches,
    )


def tool_metrics(result: ToolResult) -> dict[str, float]:
    """Per completion: tool calls, failed calls (an "error:" result) and result tokens."""
    calls = [len(row) for row in result.calls]
    errors = [sum(call.failed for call in row) for row in result.calls]
    return {
        "tools/calls": float(np.mean(calls)),
        "tools/errors": float(np.mean(errors)),
        "tools/result_tokens": float(result.tool_mask.sum(axis=1).mean()),
    }
