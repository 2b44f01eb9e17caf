"""Effort-conditioned GRPO: control tokens in prompts, per-row budgets, the length reward,
per-effort metrics, effort documents and the config checks."""

import jax
import numpy as np
import pytest

from helpers import tiny_model
from jaxllm import config as config_lib
from jaxllm.data import tasks
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.infer import Effort, Sampler
from jaxllm.infer import sampler as sampler_lib
from jaxllm.nn import Transformer
from jaxllm.rl import effort as rl_effort
from jaxllm.rl.evaluate import thinking_tokens
from jaxllm.rl.loop import grpo
from jaxllm.rl.rollout import Rollout, prompt_tokens, rollout

TOKENIZER = ByteTokenizer()
THINK, CLOSE = TOKENIZER.special["<think>"], TOKENIZER.special["</think>"]
PROBLEMS = [tasks.Problem("toy", f"{a}+{a}=?", str(2 * a)) for a in range(12)]


@pytest.fixture(scope="module")
def sampler():
    model = Transformer(tiny_model(vocab_size=TOKENIZER.vocab_size, embed_dim=32, mlp_dim=64))
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    return Sampler(model, params, TOKENIZER)


def test_the_control_token_sits_before_think_and_changes_the_logits(sampler):
    low = prompt_tokens(PROBLEMS[3], TOKENIZER, "low")
    high = prompt_tokens(PROBLEMS[3], TOKENIZER, "high")
    plain = prompt_tokens(PROBLEMS[3], TOKENIZER)
    assert low[-2:] == [TOKENIZER.special["<effort:low>"], THINK]
    assert low[:-2] == plain[:-1] and high[:-2] == plain[:-1]
    logits = sampler.model.apply({"params": sampler.params}, np.array([low, high]))
    assert np.abs(np.asarray(logits[0, -1] - logits[1, -1])).max() > 1e-3


def test_a_rollout_with_efforts_prompts_and_forces_each_group_at_its_level(sampler):
    levels = {"instant": Effort(0), "low": Effort(3)}
    forced = Sampler(sampler.model, sampler.params, TOKENIZER, efforts=levels)
    ro = rollout(forced, PROBLEMS[:2], group_size=2, max_new_tokens=8, temperature=1.0,
                 rng=jax.random.key(1), efforts=["instant", "low"])
    assert ro.efforts == ["instant", "instant", "low", "low"]
    for row, level in enumerate(ro.efforts):
        assert f"<effort:{level}><think>" in ro.prompts[row]
        completion = ro.tokens[row][ro.completion_mask[row].astype(bool)]
        assert thinking_tokens(completion, ro.lengths[row], CLOSE) <= levels[level].budget
    assert ro.completions[0].startswith("</think>")


def test_per_row_budgets_equal_per_row_runs_with_a_scalar_budget(sampler):
    efforts = [Effort(0), Effort(2), Effort(5), Effort(3, num_waits=1)]
    prompts = [prompt_tokens(p, TOKENIZER) for p in PROBLEMS[:4]]
    options = dict(max_new_tokens=10, rng=jax.random.key(2), think=sampler.think)
    compiled = sampler_lib._generate._cache_size()
    mixed = sampler.generate(prompts, effort=efforts, **options)
    for row, effort in enumerate(efforts):
        alone = sampler.generate(prompts, effort=effort, **options)
        np.testing.assert_array_equal(mixed.tokens[row], alone.tokens[row])
        spent = thinking_tokens(np.asarray(mixed.tokens[row]), int(mixed.lengths[row]), CLOSE)
        assert spent <= effort.budget
    assert sampler_lib._generate._cache_size() == compiled + 1  # mixed and scalar: one compile


def test_the_length_reward_equals_its_formula_on_hand_cases():
    thinking = np.array([0, 4, 10, 30, 5], np.float32)
    budgets = np.array([0, 8, 8, 20, 0], np.float32)
    got = rl_effort.length_reward(thinking, budgets, penalty=0.5, tolerance=0.5)
    # -0.5 * max(0, T - 0.5 B) / max(B, 1)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.5 * 6 / 8, -0.5 * 20 / 20, -0.5 * 5 / 1])


def test_the_rollout_length_reward_counts_the_thinking_of_each_completion():
    a, pad = 65, TOKENIZER.pad_id
    tokens = np.array([[a, THINK, a, a, a, CLOSE, a, pad], [a, THINK, CLOSE, a, pad, pad, pad, pad],
                       [a, THINK, a, a, a, a, a, a]])
    mask = np.zeros_like(tokens)
    mask[0, 2:7], mask[1, 2:4], mask[2, 2:] = 1, 1, 1
    ro = Rollout(tokens=tokens, positions=tokens, segment_ids=tokens, completion_mask=mask,
                 sampler_logprobs=np.zeros(tokens.shape, np.float32), lengths=mask.sum(1),
                 prompts=[""] * 3, completions=[""] * 3,
                 efforts=["low", "instant", "high"])
    np.testing.assert_array_equal(rl_effort.row_thinking(ro, CLOSE), [3, 0, 6])
    cfg = config_lib.GRPOConfig(efforts="instant,low,high", effort_budgets="0,2,8",
                                length_penalty=1.0, length_tolerance=0.5)
    np.testing.assert_allclose(rl_effort.rollout_length_reward(ro, np.ones(3), cfg, CLOSE),
                               [-(3 - 1) / 2, 0.0, -(6 - 4) / 8])
    # Only completions with a positive task reward pay for their length.
    np.testing.assert_allclose(
        rl_effort.rollout_length_reward(ro, np.array([0.0, 1.0, 0.5]), cfg, CLOSE),
        [0.0, 0.0, -(6 - 4) / 8])


def test_levels_cycle_over_the_prompts_of_a_step_and_take_their_budgets():
    cfg = config_lib.GRPOConfig(efforts="low,high", effort_budgets="4,16")
    assert rl_effort.efforts_of_step(cfg, 1, 3) == ["low", "high", "low"]
    assert rl_effort.efforts_of_step(cfg, 2, 3) == ["high", "low", "high"]
    assert rl_effort.levels(cfg) == {"low": Effort(4), "high": Effort(16)}
    assert rl_effort.levels(config_lib.GRPOConfig(efforts="medium"))["medium"].budget == 128
    assert rl_effort.efforts_of_step(config_lib.GRPOConfig(), 1, 3) is None


def letters(prompts, completions, **_):
    return [sum(c.isascii() and c.islower() for c in text) / max(len(text), 1)
            for text in completions]


@pytest.mark.slow
def test_a_two_step_grpo_run_with_efforts_logs_per_effort_metrics(tmp_path):
    config = config_lib.Config(
        model=tiny_model(vocab_size=TOKENIZER.vocab_size, embed_dim=32, mlp_dim=64),
        data=config_lib.DataConfig(source="arithmetic"),
        train=config_lib.TrainConfig(steps=2, batch_size=8, learning_rate=1e-2, warmup_steps=0,
                                     weight_decay=0.0, log_every=1),
        grpo=config_lib.GRPOConfig(group_size=4, max_completion_len=8, eval_every=0,
                                   efforts="instant,low", effort_budgets="0,3",
                                   length_penalty=0.1),
        workdir=str(tmp_path),
    )
    lines = []
    history = grpo(config, log=lines.append, reward_fns=[letters], problems=PROBLEMS)
    assert [r["step"] for r in history] == [1, 2]
    assert " | thinking instant 0.0 low " in next(l for l in lines if l.startswith("step "))
    for record in history:
        assert record["effort/instant/thinking_tokens"] == 0.0
        assert record["effort/low/thinking_tokens"] <= 3.0
        # Two prompts a step, one per level, groups of equal size: the levels' mean rewards
        # average to the step's.
        mean = (record["effort/instant/reward"] + record["effort/low/reward"]) / 2
        assert mean == pytest.approx(record["reward"], abs=1e-6)
        assert "effort/low/letters" in record


def test_effort_documents_carry_the_token_and_a_solution_of_fitting_length():
    text = tasks.document(tasks.Problem("quadratic", "x^2-5x+6=0, x=?", "2, 3"))
    steps = "r+s=5,r*s=6,(x-2)(x-3)=0"
    assert text == f"Q: x^2-5x+6=0, x=?\n<think>{steps}</think><answer>2, 3</answer>"
    want = {"instant": "", "low": "(x-2)(x-3)=0", "medium": "r*s=6,(x-2)(x-3)=0", "high": steps}
    for level, thought in want.items():
        assert tasks.effort_document(text, level) == (
            f"Q: x^2-5x+6=0, x=?\n<effort:{level}><think>{thought}</think><answer>2, 3</answer>")
    docs = tasks.effort_documents([text] * 2)
    assert docs[0] == docs[1] and "<effort:" in docs[0]


@pytest.mark.parametrize(
    "grpo_fields,field",
    [
        (dict(efforts="low,extreme"), "grpo.efforts"),
        (dict(efforts="low,low"), "grpo.efforts"),
        (dict(efforts="low,high", effort_budgets="8"), "grpo.effort_budgets"),
        (dict(efforts="low", effort_budgets="-3"), "grpo.effort_budgets"),
        (dict(length_penalty=0.1), "grpo.length_penalty"),
        (dict(efforts="low", length_tolerance=1.5), "grpo.length_tolerance"),
        (dict(efforts="low", tools="calc"), "grpo.tools"),
    ],
)
def test_bad_effort_settings_name_the_field(grpo_fields, field):
    config = config_lib.Config(model=tiny_model(), grpo=config_lib.GRPOConfig(**grpo_fields))
    with pytest.raises(config_lib.ConfigError, match=f"^{field}:"):
        config_lib.validate(config)


def test_effort_documents_need_the_reasoning_corpus():
    config = config_lib.Config(model=tiny_model(), data=config_lib.DataConfig(
        source="arithmetic", effort_documents=True))
    with pytest.raises(config_lib.ConfigError, match="^data.effort_documents:"):
        config_lib.validate(config)
