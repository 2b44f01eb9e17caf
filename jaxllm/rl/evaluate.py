"""Held-out accuracy of a model on task problems, at an effort level and a vote count."""

import collections
import math

import jax
import numpy as np

from jaxllm.data import tasks
from jaxllm.infer import Sampler, extract_answer, majority_vote
from jaxllm.infer import effort as effort_lib
from jaxllm.infer.sampler import to_host
from jaxllm.rl import visual
from jaxllm.rl.rollout import prompt_tokens, stop_ids
from jaxllm.rl.verify import canonical_answer, is_correct


def thinking_tokens(tokens: np.ndarray, length: int, close_id: int) -> int:
    """Tokens of a completion (which starts inside a thought) before its `</think>`."""
    row = list(tokens[:length])
    return row.index(close_id) if close_id in row else length


def evaluate(
    sampler: Sampler,
    problems: list[tasks.Problem],
    *,
    rng: jax.Array,
    effort: str | effort_lib.Effort | None = None,
    control: str | None = None,
    votes: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy of the majority answer of `votes` samples per problem, equal answers in
    different forms ("3/4", "0.75") voting together.

    `effort` budget-forces the thoughts; `control` puts that level's control token
    `<effort:LEVEL>` in each prompt and forces nothing. Image problems' pictures go with
    their prompts (`jaxllm.rl.visual`).

    Returns accuracy, per-family accuracy (`accuracy/<family>`), the mean agreement of the
    votes, and the mean thinking and completion tokens per sample.
    """
    answers, thinking, lengths = sample_answers(
        sampler, problems, rng=rng, effort=effort, control=control, votes=votes,
        temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct, agreement = collections.defaultdict(list), []
    for i, problem in enumerate(problems):
        vote = majority_vote([canonical_answer(problem.family, answer)
                              for answer in answers[i * votes:(i + 1) * votes]])
        agreement.append(vote.agreement)
        correct[problem.family].append(is_correct(
            problem.family, vote.answer, problem.answer, getattr(problem, "numbers", None),
            getattr(problem, "target", None)))
    everything = [c for family in correct.values() for c in family]
    return {
        "accuracy": float(np.mean(everything)),
        **{f"accuracy/{f}": float(np.mean(c)) for f, c in sorted(correct.items())},
        "agreement": float(np.mean(agreement)),
        "thinking_tokens": float(np.mean(thinking)),
        "completion_tokens": float(np.mean(lengths)),
    }


def sample_answers(
    sampler: Sampler,
    problems: list[tasks.Problem],
    *,
    rng: jax.Array,
    effort: str | effort_lib.Effort | None = None,
    control: str | None = None,
    votes: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    batch_size: int = 256,
) -> tuple[list[str | None], list[int], list[int]]:
    """`votes` samples of each problem, in `batch_size` chunks (as `evaluate`): their
    answers (None where there is none), thinking tokens and completion tokens."""
    tokenizer = sampler.tokenizer
    think = sampler.think
    forcing = {}
    if effort is not None:
        forcing = {"effort": effort_lib.resolve(effort, sampler.efforts), "think": think}
    patch_size = visual.patch_size_of(sampler)
    rows = [prompt_tokens(p, tokenizer, control, patch_size=patch_size)
            for p in problems for _ in range(votes)]
    patches = visual.prompt_patches(problems, patch_size)
    if patches is not None:
        patches = np.repeat(patches, votes, axis=0)
    prompt_len = max(len(r) for r in rows)
    batch_size = min(batch_size, len(rows))
    answers, thinking, lengths = [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        padding = batch_size - len(chunk)  # one shape, one compilation
        images = {} if patches is None else {"patches": _padded(patches[start:start + batch_size],
                                                                padding)}
        result = to_host(sampler.generate(
            chunk + [chunk[-1]] * padding,
            max_new_tokens=max_new_tokens, temperature=temperature,
            rng=jax.random.fold_in(rng, start), stop_ids=stop_ids(tokenizer),
            prompt_len=prompt_len, **forcing, **images,
        ))
        for tokens, length in zip(result.tokens[:len(chunk)], result.lengths[:len(chunk)]):
            answers.append(extract_answer(tokenizer.decode(tokens[:length])))
            thinking.append(thinking_tokens(tokens, length, think.close))
            lengths.append(length)
    return answers, thinking, lengths


def paired_gain(before, after) -> dict[str, float]:
    """The change in accuracy between two evaluations of the same problems, `before` and
    `after` their per-problem correctness, as a paired difference: with n problems, `fixed`
    (c) wrong before and right after, `broken` (b) the reverse, the gain is (c - b) / n and
    its standard error sqrt(b + c - (c - b)^2 / n) / n, that of the mean of the per-problem
    differences in {-1, 0, 1}."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_gain: needs two equal, non-empty lists, got {len(before)} "
                         f"and {len(after)}")
    n = len(before)
    fixed = sum(not x and y for x, y in zip(before, after))
    broken = sum(x and not y for x, y in zip(before, after))
    return {"problems": n, "fixed": fixed, "broken": broken, "gain": (fixed - broken) / n,
            "stderr": math.sqrt(fixed + broken - (fixed - broken) ** 2 / n) / n}


def _padded(patches: np.ndarray, padding: int) -> np.ndarray:
    """`patches` with its last row repeated `padding` more times."""
    return np.concatenate([patches, np.repeat(patches[-1:], padding, axis=0)])
