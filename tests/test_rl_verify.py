"""Answer parsing, verifiers and rewards: equivalent forms pass, wrong and hedged ones fail,
adversarial text runs no code and returns at once."""

import os
import time
from fractions import Fraction

import jax
import numpy as np
import pytest

from jaxllm import presets
from jaxllm.data import tasks
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.infer import Sampler
from jaxllm.infer.sampler import GenerationResult
from jaxllm.nn import Transformer
from jaxllm.rl.evaluate import evaluate
from jaxllm.rl.rewards import accuracy_reward, format_reward, score
from jaxllm.rl.verify import canonical_answer, is_correct
from jaxllm.tools import parse

ADVERSARIAL = [
    "__import__('os').system('echo hi')",
    "9**9**9**9",
    "1" * 1_000_000,
    "(" * 200 + "1" + ")" * 200,
    "9" * 40,
    "1e999999",
    "٣",  # a non-ASCII digit
]


@pytest.mark.parametrize(
    "family, text, answer, numbers, target",
    [
        ("arithmetic", "-12", "-12", None, None),
        ("arithmetic", " 7 ", "7", None, None),
        ("linear", "3/4", "0.75", None, None),
        ("linear", "0.75", "3/4", None, None),
        ("linear", "6/2", "3", None, None),
        ("linear", "-1/2", "-0.5", None, None),
        ("quadratic", "3, 2", "2, 3", None, None),
        ("quadratic", "{-1, 4}", "-1, 4", None, None),
        ("quadratic", "[4,-1]", "-1, 4", None, None),
        ("quadratic", "2", "2", None, None),
        ("countdown", "(3+5)*2", "(3+5)*2", [3, 5, 2], 16),
        ("countdown", "2 * (5 + 3)", "(3+5)*2", [3, 5, 2], 16),
        ("countdown", "8/(3-1/2)*5", "", [8, 3, 1, 2, 5], 16),  # exact: 8 / (5/2) * 5
    ],
)
def test_equivalent_correct_answers_pass(family, text, answer, numbers, target):
    assert is_correct(family, text, answer, numbers, target)


@pytest.mark.parametrize(
    "family, text, answer, numbers, target",
    [
        ("arithmetic", "13", "12", None, None),
        ("arithmetic", "4 or 5", "4", None, None),
        ("arithmetic", "4, 5", "4", None, None),
        ("arithmetic", "4 4", "4", None, None),
        ("arithmetic", "x = 4", "4", None, None),
        ("arithmetic", "", "4", None, None),
        ("linear", "0.7", "3/4", None, None),
        ("linear", "3/0", "3", None, None),
        ("quadratic", "2", "2, 3", None, None),
        ("quadratic", "2, 3, 4", "2, 3", None, None),
        ("quadratic", "2, 2", "2", None, None),
        ("quadratic", "2 or 3", "2, 3", None, None),
        ("quadratic", "{2, 3", "2, 3", None, None),
        ("countdown", "(3+5)*2", "", [3, 5, 2], 17),  # wrong value
        ("countdown", "3*5+1", "", [3, 5, 2], 16),  # a number not given
        ("countdown", "(3+5)*2*1", "", [3, 5, 2], 16),  # an extra number
        ("countdown", "3+5+8", "", [3, 5, 8, 2], 16),  # a given number left unused
        ("countdown", "-2+18", "", [2, 18], 16),  # no unary minus
        ("countdown", "2**4", "", [2, 4], 16),  # no exponent
        ("countdown", "(3+5)*2 = 16", "", [3, 5, 2], 16),
        ("countdown", "16/0+2", "", [16, 0, 2], 16),
    ],
)
def test_wrong_hedged_and_multiple_answers_fail(family, text, answer, numbers, target):
    assert not is_correct(family, text, answer, numbers, target)


def test_missing_answer_fails_and_bad_requests_raise():
    assert not is_correct("arithmetic", None, "4")
    with pytest.raises(ValueError, match="family"):
        is_correct("geometry", "4", "4")
    with pytest.raises(ValueError, match="target"):
        is_correct("countdown", "1+2", "1+2", [1, 2], None)
    with pytest.raises(parse.ParseError):  # a bad reference answer is a task bug
        is_correct("arithmetic", "4", "four")


def test_expression_value_and_literals_match_a_hand_evaluation():
    expression = parse.parse_expression("100 - (7 * 8) / 3 + 2")
    assert expression.value == Fraction(100) - Fraction(56, 3) + 2
    assert expression.numbers == (100, 7, 8, 3, 2)


@pytest.mark.parametrize("family", ["arithmetic", "linear", "quadratic", "countdown"])
def test_adversarial_strings_run_no_code_and_return_quickly(family, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))
    for text in ADVERSARIAL:
        start = time.perf_counter()
        correct = is_correct(family, text, "1, 2" if family == "quadratic" else "1", [9, 9], 81)
        completion = f"<think></think><answer>{text}</answer>"
        (reward,) = accuracy_reward(
            [""], [completion], family=[family], answer=["1, 2" if family == "quadratic" else "1"],
            numbers=[[9, 9]], target=[81],
        )
        elapsed = time.perf_counter() - start
        assert not correct and reward == 0.0, text[:40]
        assert elapsed < 0.1, (text[:40], elapsed)
    assert calls == []


def test_format_reward_wants_think_then_answer_once():
    completions = [
        "<think>a</think><answer>1</answer>",
        " <think>a\nb</think>\n<answer>1</answer>\n",
        "<answer>1</answer>",
        "<think>a</think>text<answer>1</answer>",
        "<think>a</think><answer>1</answer><answer>2</answer>",
        "<answer>1</answer><think>a</think>",
        "<think>a</think><answer>1</answer> trailing",
    ]
    assert format_reward([""] * 7, completions) == [1, 1, 0, 0, 0, 0, 0]
    assert format_reward(["Q: 1+1? <think>"], ["a</think><answer>2</answer>"]) == [1.0]


def test_score_weights_functions_and_counts_failures():
    def flaky(prompts, completions, **_):
        if any(c == "boom" for c in completions):
            raise RuntimeError("boom")
        return [0.5] * len(completions)

    def not_finite(prompts, completions, **_):
        return [float("nan"), "x", 2.0]

    completions = ["<think>t</think><answer>4</answer>", "boom", "<answer>5</answer>"]
    columns = dict(family=["arithmetic"] * 3, answer=["4", "4", "5"])
    rewards = score(
        [accuracy_reward, format_reward, flaky, not_finite], [""] * 3, completions,
        weights=[1.0, 0.5, 2.0, 1.0], **columns,
    )
    np.testing.assert_array_equal(rewards.per_function["accuracy_reward"], [1, 0, 1])
    np.testing.assert_array_equal(rewards.per_function["format_reward"], [1, 0, 0])
    np.testing.assert_array_equal(rewards.per_function["flaky"], [0.5, 0, 0.5])
    np.testing.assert_array_equal(rewards.per_function["not_finite"], [0, 0, 2])
    assert rewards.failures == {
        "accuracy_reward": 0, "format_reward": 0, "flaky": 1, "not_finite": 2
    }
    np.testing.assert_allclose(rewards.total, [1 + 0.5 + 1, 0, 1 + 1 + 2])
    with pytest.raises(ValueError, match="weights"):
        score([flaky], [""], ["a"], weights=[1.0, 2.0])


@pytest.mark.parametrize("family, forms", [
    ("linear", [" 3/4", "0.75", "6/8"]),
    ("arithmetic", ["-12", " -12 ", "-12.0"]),
    ("quadratic", ["3, 2", "{2, 3}", "[2,3]"]),
    ("colour", ["Red", " red"]),
    ("countdown", ["(3+5)*2", "( 3 + 5 ) * 2"]),
])
def test_equal_answers_share_one_canonical_form_that_still_checks(family, forms):
    canonical = {canonical_answer(family, form) for form in forms}
    assert len(canonical) == 1
    answer = forms[0].strip().lower()
    assert is_correct(family, canonical.pop(), answer, [3, 5, 2], 16)


def test_canonical_forms_keep_wrong_answers_wrong():
    assert canonical_answer("quadratic", "2, 2, 3") == "2, 2, 3"  # a repeated root
    assert not is_correct("quadratic", canonical_answer("quadratic", "2, 2, 3"), "2, 3")
    assert canonical_answer("linear", "x = 4") == "x = 4"
    assert canonical_answer("linear", None) is None
    with pytest.raises(ValueError, match="family: unknown 'poetry'"):
        canonical_answer("poetry", "4")


def test_votes_count_equal_answers_in_different_forms_together(monkeypatch):
    """Self-consistency votes on answers, not strings: "3/4" and "0.75" outvote "1"."""
    problems = [tasks.Problem("linear", "4x = 3, x = ?", "3/4"),
                tasks.Problem("quadratic", "x^2 - 5x + 6 = 0", "2, 3")]
    answers = ["1", "3/4", "0.75", "1, 6", "3, 2", "2, 3"]  # three votes per problem
    tokenizer = ByteTokenizer()

    def generate(prompts, **_):
        rows = [tokenizer.encode(f"</think><answer>{a}</answer>") for a in answers]
        width = max(len(r) for r in rows)
        tokens = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
        return GenerationResult(tokens=tokens, lengths=np.array([len(r) for r in rows]),
                                logprobs=np.zeros(tokens.shape, np.float32))

    sampler = Sampler(Transformer(presets.tiny_dense()), None, tokenizer)
    monkeypatch.setattr(sampler, "generate", generate)
    result = evaluate(sampler, problems, rng=jax.random.key(0), votes=3)
    assert result["accuracy"] == 1.0
    assert result["agreement"] == pytest.approx(2 / 3)
