"""Reward functions and their weighted combination.

A reward function has the TRL/Tunix interface `fn(prompts, completions, **columns) ->
list[float]`: one score per completion, with the task's dataset columns (family, answer,
numbers, target, ...) passed as lists aligned with the completions. Functions ignore the
columns they do not use. The completion is the generated text after the prompt.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from jaxllm.infer.voting import extract_answer
from jaxllm.rl.verify import is_correct

RewardFunction = Callable[..., list[float]]

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"


def accuracy_reward(prompts, completions, *, family, answer, numbers=None, target=None, **_):
    """1.0 where the extracted answer is correct for its task, else 0.0."""
    numbers = numbers if numbers is not None else [None] * len(completions)
    target = target if target is not None else [None] * len(completions)
    return [
        float(is_correct(f, extract_answer(c), a, n, t))
        for c, f, a, n, t in zip(completions, family, answer, numbers, target, strict=True)
    ]


def _well_formed(text: str) -> bool:
    """`<think>...</think><answer>...</answer>`, each tag once, only whitespace between."""
    tags = (THINK, END_THINK, ANSWER, END_ANSWER)
    if any(text.count(tag) != 1 for tag in tags):
        return False
    positions = [text.find(tag) for tag in tags]
    if positions != sorted(positions):
        return False
    think, end_think, answer, end_answer = positions
    outside = (
        text[:think],
        text[end_think + len(END_THINK):answer],
        text[end_answer + len(END_ANSWER):],
    )
    return not any(part.strip() for part in outside)


def format_reward(prompts, completions, **_):
    """1.0 where the completion has the R1 structure `<think>...</think><answer>...</answer>`.

    A prompt that ends with "<think>" opens the reasoning itself, so its completion is
    checked as if it began with that tag.
    """
    return [
        float(_well_formed(THINK + c if p.rstrip().endswith(THINK) else c))
        for p, c in zip(prompts, completions, strict=True)
    ]


@dataclasses.dataclass(frozen=True)
class Rewards:
    """Scores of one batch: the weighted total, each function's own, and its failures."""

    total: np.ndarray  # [N] float32, sum of weight * score
    per_function: dict[str, np.ndarray]  # name -> [N] unweighted scores
    failures: dict[str, int]  # name -> samples whose score was an exception or not finite


def _name(fn: RewardFunction) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _scores(fn: RewardFunction, prompts, completions, columns) -> tuple[np.ndarray, int]:
    """Scores of one function with failures as 0. If the batch call raises or returns the
    wrong number of scores, each sample is scored alone so only the failing ones score 0."""
    n = len(completions)
    try:
        batch = list(fn(prompts, completions, **columns))
        if len(batch) != n:
            raise ValueError(f"{_name(fn)} returned {len(batch)} scores for {n} completions")
    except Exception:  # noqa: BLE001 - a user reward function may raise anything
        batch = []
        for i in range(n):
            try:
                (score,) = fn(prompts[i:i + 1], completions[i:i + 1],
                              **{k: v[i:i + 1] for k, v in columns.items()})
            except Exception:  # noqa: BLE001
                score = math.nan
            batch.append(score)
    values = np.array([_finite_or_nan(s) for s in batch], np.float64)
    failed = ~np.isfinite(values)
    return np.where(failed, 0.0, values).astype(np.float32), int(failed.sum())


def _finite_or_nan(score) -> float:
    try:
        value = float(score)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def score(
    reward_fns: Sequence[RewardFunction],
    prompts: Sequence[str],
    completions: Sequence[str],
    weights: Sequence[float] | None = None,
    **columns: Sequence,
) -> Rewards:
    """Runs every reward function and sums their scores with `weights` (default all 1).

    A function that raises, or gives a score that is not a finite number, scores 0 for the
    samples concerned; those are counted in `Rewards.failures` and the batch goes on.
    """
    weights = [1.0] * len(reward_fns) if weights is None else list(weights)
    if len(weights) != len(reward_fns):
        raise ValueError(f"weights: {len(weights)} given for {len(reward_fns)} reward functions")
    names = [_name(fn) for fn in reward_fns]
    if len(set(names)) != len(names):
        raise ValueError(f"reward_fns: names must be distinct to be logged apart, got {names}")
    prompts, completions = list(prompts), list(completions)
    columns = {k: list(v) for k, v in columns.items()}
    total = np.zeros(len(completions), np.float32)
    per_function, failures = {}, {}
    for name, fn, weight in zip(names, reward_fns, weights):
        per_function[name], failures[name] = _scores(fn, prompts, completions, columns)
        total += weight * per_function[name]
    return Rewards(total, per_function, failures)
