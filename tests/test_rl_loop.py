"""The GRPO phase end to end: rollout layout, learning a toy reward, resuming."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from helpers import tiny_model
from jaxllm import config as config_lib
from jaxllm.data import tasks
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.infer import Sampler
from jaxllm.nn import Transformer
from jaxllm.rl.loop import grpo
from jaxllm.rl import rollout as rollout_lib
from jaxllm.rl.rollout import prompt_tokens, rollout

PROBLEMS = [tasks.Problem("toy", f"{a}+{a}=?", str(2 * a)) for a in range(40)]


def letters(prompts, completions, **_):
    """The toy reward: the share of lowercase ASCII letters among a completion's characters."""
    return [sum(c.isascii() and c.islower() for c in text) / max(len(text), 1)
            for text in completions]


def toy_config(workdir, steps: int) -> config_lib.Config:
    return config_lib.Config(
        model=tiny_model(vocab_size=ByteTokenizer().vocab_size, embed_dim=32, mlp_dim=64),
        mesh=config_lib.MeshConfig(data=2, fsdp=4),
        data=config_lib.DataConfig(source="arithmetic"),
        train=config_lib.TrainConfig(steps=steps, batch_size=32, learning_rate=2e-2,
                                     warmup_steps=0, weight_decay=0.0, log_every=1),
        grpo=config_lib.GRPOConfig(group_size=8, max_completion_len=8, eval_every=0),
        checkpoint=config_lib.CheckpointConfig(every=4),
        workdir=str(workdir),
    )


@pytest.mark.parametrize("stop_at_once", [False, True])
def test_rollout_rows_are_prompt_then_completion_with_true_positions(stop_at_once, monkeypatch):
    """With every token a stop token, each completion is one token long and the rows end at
    the next multiple of WIDTH_STEP (here 2) instead of at the 5-token budget."""
    if stop_at_once:
        monkeypatch.setattr(rollout_lib, "WIDTH_STEP", 2)
        monkeypatch.setattr(rollout_lib, "stop_ids", lambda tok: tuple(range(tok.vocab_size)))
    tokenizer = ByteTokenizer()
    model = Transformer(tiny_model(vocab_size=tokenizer.vocab_size, embed_dim=32, mlp_dim=64))
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    problems = [PROBLEMS[3], PROBLEMS[12]]  # prompts of different lengths
    ro = rollout(Sampler(model, params, tokenizer), problems, group_size=2, max_new_tokens=5,
                 temperature=1.0, rng=jax.random.key(1))
    width = max(len(prompt_tokens(p, tokenizer)) for p in problems)
    if stop_at_once:
        assert list(ro.lengths) == [1, 1, 1, 1]
    assert ro.tokens.shape == (4, width + (2 if stop_at_once else 5))
    for row in range(4):
        prompt = prompt_tokens(problems[row // 2], tokenizer)
        start, end = len(prompt), len(prompt) + ro.lengths[row]
        np.testing.assert_array_equal(ro.tokens[row, :start], prompt)
        np.testing.assert_array_equal(np.flatnonzero(ro.segment_ids[row]), np.arange(end))
        np.testing.assert_array_equal(ro.positions[row], np.arange(ro.tokens.shape[1]))
        np.testing.assert_array_equal(np.flatnonzero(ro.completion_mask[row]),
                                      np.arange(start, end))
        assert ro.completions[row] == tokenizer.decode(ro.tokens[row, start:end])


@pytest.mark.slow
def test_grpo_raises_a_toy_reward_and_resumes_exactly(tmp_path):
    history = grpo(toy_config(tmp_path / "run", 12), log=lambda _: None, reward_fns=[letters],
                   problems=PROBLEMS)
    rewards = [r["reward"] for r in history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.25, rewards
    assert all(r["reward/letters_failures"] == 0 for r in history)

    # Stop at step 5, start again: the checkpoint at step 4 carries the run on identically.
    config = toy_config(tmp_path / "resumed", 12)
    grpo(config, log=lambda _: None, stop_after=6, reward_fns=[letters], problems=PROBLEMS)
    resumed = grpo(config, log=lambda _: None, reward_fns=[letters], problems=PROBLEMS)
    assert [r["step"] for r in resumed] == list(range(7, 13))
    assert [r["reward"] for r in resumed] == rewards[6:]
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert [r["step"] for r in logged] == list(range(1, 13))


def test_sigterm_saves_at_the_current_rl_step_and_returns(tmp_path):
    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("step     1/"):
            os.kill(os.getpid(), signal.SIGTERM)

    lines, handler = [], signal.getsignal(signal.SIGTERM)
    history = grpo(toy_config(tmp_path, 12), log=log, reward_fns=[letters], problems=PROBLEMS)
    assert "stopped at RL step 2 on a preemption notice (SIGTERM)" in lines
    assert [r["step"] for r in history] == [1, 2]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["2"]
    assert signal.getsignal(signal.SIGTERM) is handler
