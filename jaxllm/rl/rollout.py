"""Rollouts: G sampled completions per prompt, laid out as one GRPO update batch.

A row is the left-padded prompt followed by its completion: [B, P + W] tokens, with
positions that start at 0 on the first real token, segment id 1 on real tokens (0 on
padding), and `completion_mask` 1 on the completion tokens the loss counts. W is the
longest completion rounded up to a multiple of `WIDTH_STEP` (at most the sampling budget),
so the update computes no columns past it and compiles for only a few widths.
"""

import dataclasses

import jax
import numpy as np

from jaxllm.data import tasks
from jaxllm.data.tokenizer import chat_prompt
from jaxllm.infer import Sampler
from jaxllm.infer import effort as effort_lib
from jaxllm.infer.sampler import to_host

WIDTH_STEP = 16


def prompt_tokens(problem: tasks.Problem, tokenizer, effort: str | None = None) -> list[int]:
    """`<bos>` and the task's prompt, or the prompt through the tokenizer's chat template
    (`chat_prompt`), then the control token `<effort:LEVEL>` of an `effort` level, then
    `<think>` if the vocabulary has it: the model continues with its reasoning."""
    think = [tokenizer.special["<think>"]] if "<think>" in tokenizer.special else []
    control = []
    if effort is not None:
        token = effort_lib.control_token(effort)
        if token not in tokenizer.special:
            raise ValueError(f"effort: the vocabulary has no control token {token}")
        control = [tokenizer.special[token]]
    return chat_prompt(tokenizer, tasks.prompt(problem)) + control + think


def stop_ids(tokenizer) -> tuple[int, ...]:
    """A completion ends with `</answer>` (where it is one token), or with `<eos>`."""
    answer = tokenizer.special.get("</answer>")
    return (tokenizer.eos_id,) if answer is None else (answer, tokenizer.eos_id)


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One batch of completions, G consecutive rows per prompt (numpy arrays)."""

    tokens: np.ndarray  # [B, P + W]
    positions: np.ndarray  # [B, P + W]
    segment_ids: np.ndarray  # [B, P + W]
    completion_mask: np.ndarray  # [B, P + W]
    lengths: np.ndarray  # [B] completion tokens, the stop token included
    prompts: list[str]  # [B] prompt texts
    completions: list[str]  # [B] completion texts, the stop token included
    efforts: list[str] | None = None  # [B] effort levels, when sampled with efforts

    def batch(self) -> dict[str, np.ndarray]:
        """The arrays of a GRPO update batch (advantages and log-probs are added later)."""
        return {
            "tokens": self.tokens,
            "positions": self.positions,
            "segment_ids": self.segment_ids,
            "completion_mask": self.completion_mask,
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
    budget-forced at that level of `sampler.efforts`."""
    tokenizer = sampler.tokenizer
    levels = [None] * len(problems) if efforts is None else efforts
    prompts = [prompt_tokens(p, tokenizer, level)
               for p, level in zip(problems, levels, strict=True) for _ in range(group_size)]
    rows = None if efforts is None else [level for level in efforts for _ in range(group_size)]
    forcing = {}
    if rows is not None:
        forcing = {"effort": [effort_lib.resolve(r, sampler.efforts) for r in rows],
                   "think": sampler.think}
    prompt_len = prompt_len or max(len(p) for p in prompts)
    result = to_host(sampler.generate(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, rng=rng,
        stop_ids=stop_ids(tokenizer), prompt_len=prompt_len, **forcing,
    ))
    prompt_lengths = np.array([len(p) for p in prompts])
    used = min(max_new_tokens, -(-int(result.lengths.max()) // WIDTH_STEP) * WIDTH_STEP)
    width = prompt_len + used
    column = np.arange(width)[None]
    first = (prompt_len - prompt_lengths)[:, None]
    end = prompt_len + result.lengths[:, None]
    padded = np.full((len(prompts), prompt_len), tokenizer.pad_id, np.int32)
    for row, tokens in enumerate(prompts):
        padded[row, prompt_len - len(tokens):] = tokens
    real = (column >= first) & (column < end)
    return Rollout(
        tokens=np.concatenate([padded, result.tokens[:, :used]], axis=1),
        positions=np.maximum(column - first, 0).astype(np.int32),
        segment_ids=real.astype(np.int32),
        completion_mask=(real & (column >= prompt_len)).astype(np.int32),
        lengths=np.asarray(result.lengths),
        prompts=[tokenizer.decode(p) for p in prompts],
        completions=[
            tokenizer.decode(row[:length]) for row, length in zip(result.tokens, result.lengths)
        ],
        efforts=rows,
    )
