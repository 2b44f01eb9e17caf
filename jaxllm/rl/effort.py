"""Effort-conditioned GRPO: each prompt's effort level, its budget, and the length reward.

A prompt names its level with a control token, `<effort:LEVEL>` right before `<think>`;
its whole group samples under that level's budget forcing. The reward adds a length term
relative to the level's thinking budget B (docs/rl.md, "Effort-conditioned GRPO"):

    r_len = -lambda * max(0, T - rho * B) / max(B, 1)

T: the completion's thinking tokens (before its `</think>`); lambda: grpo.length_penalty;
rho: grpo.length_tolerance, the share of the budget that costs nothing. It applies only to
completions whose task reward is positive: a wrong answer gains nothing by being short.
"""

import numpy as np

from jaxllm.config import GRPOConfig, split_list
from jaxllm.infer import effort as effort_lib
from jaxllm.rl.evaluate import thinking_tokens
from jaxllm.rl.rollout import Rollout


def levels(cfg: GRPOConfig) -> dict[str, effort_lib.Effort]:
    """The budget forcing of each level of `grpo.efforts`: `grpo.effort_budgets`, or the
    levels of `effort_lib.EFFORTS`."""
    budgets = split_list(cfg.effort_budgets)
    if not budgets:
        return {name: effort_lib.EFFORTS[name] for name in cfg.effort_levels}
    return {name: effort_lib.Effort(int(b)) for name, b in zip(cfg.effort_levels, budgets)}


def efforts_of_step(cfg: GRPOConfig, step: int, count: int) -> list[str] | None:
    """The level of each of the `count` prompts of RL step `step` (1-based): the levels in
    turn, starting one further each step; None when efforts are off."""
    names = cfg.effort_levels
    if not names:
        return None
    return [names[(step - 1 + i) % len(names)] for i in range(count)]


def length_reward(thinking: np.ndarray, budgets: np.ndarray, *, penalty: float,
                  tolerance: float) -> np.ndarray:
    """r_len per completion [N] from its thinking tokens [N] and its budget [N]."""
    over = np.maximum(0.0, thinking - tolerance * budgets)
    return (-penalty * over / np.maximum(budgets, 1)).astype(np.float32)


def row_thinking(ro: Rollout, close_id: int) -> np.ndarray:
    """[B] thinking tokens of each completion of the rollout."""
    mask = ro.completion_mask.astype(bool)
    return np.array([thinking_tokens(row[m], length, close_id)
                     for row, m, length in zip(ro.tokens, mask, ro.lengths)], np.float32)


def rollout_length_reward(ro: Rollout, task_reward: np.ndarray, cfg: GRPOConfig,
                          close_id: int) -> np.ndarray:
    """[B] r_len of a rollout sampled with efforts, where the task reward [B] is positive;
    0 elsewhere."""
    budget = levels(cfg)
    r_len = length_reward(row_thinking(ro, close_id),
                          np.array([budget[e].budget for e in ro.efforts], np.float32),
                          penalty=cfg.length_penalty, tolerance=cfg.length_tolerance)
    return np.where(task_reward > 0, r_len, 0.0).astype(np.float32)


def metrics(ro: Rollout, total: np.ndarray, per_function: dict[str, np.ndarray],
            close_id: int) -> dict[str, float]:
    """`effort/<level>/...`: mean total reward, thinking tokens and each reward function's
    mean, per level of a rollout sampled with efforts."""
    thinking = row_thinking(ro, close_id)
    efforts = np.array(ro.efforts)
    out = {}
    for level in dict.fromkeys(ro.efforts):
        rows = efforts == level
        out[f"effort/{level}/reward"] = float(total[rows].mean())
        out[f"effort/{level}/thinking_tokens"] = float(thinking[rows].mean())
        for name, scores in per_function.items():
            out[f"effort/{level}/{name}"] = float(scores[rows].mean())
    return out
