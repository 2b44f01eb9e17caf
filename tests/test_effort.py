"""Budget forcing step by step against hand-written traces; answer extraction and voting."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.infer import Effort, ThinkTokens, Vote, extract_answer, majority_vote
from jaxllm.infer import effort as effort_lib
from jaxllm.infer import self_consistency

OPEN, CLOSE, W1, W2, X = 100, 101, 50, 51, 7
THINK = ThinkTokens(OPEN, CLOSE, wait=(W1, W2))


def run(sampled, effort, first_token=OPEN):
    """Feeds one row's `sampled` tokens through `force`; returns the emitted tokens."""
    state = effort_lib.init_state(jnp.array([first_token]), THINK)
    emitted = []
    for token in sampled:
        token, state = effort_lib.force(state, jnp.array([token]), effort.budget, effort.num_waits,
                                        THINK)
        emitted.append(int(token[0]))
    return emitted


@pytest.mark.parametrize(
    "sampled,effort,want",
    [
        # instant: </think> at once, then the model is free.
        ([X, X, X], Effort(0), [CLOSE, X, X]),
        # the budget is spent after 3 thinking tokens.
        ([X, X, X, X, X], Effort(3), [X, X, X, CLOSE, X]),
        # an early </think> is kept without waits ...
        ([X, CLOSE, X], Effort(5), [X, CLOSE, X]),
        # ... and replaced by "Wait" (two tokens) up to num_waits times.
        ([X, CLOSE, X, X, CLOSE, CLOSE, X, CLOSE, X], Effort(9, num_waits=2),
         [X, W1, W2, X, W1, W2, X, CLOSE, X]),
        # the budget cuts a "Wait" short; the waits counted as thinking.
        ([CLOSE, X, X, X], Effort(2, num_waits=1), [W1, W2, CLOSE, X]),
        # a second thought draws on the same budget.
        ([X, CLOSE, OPEN, X, X, X], Effort(2), [X, CLOSE, OPEN, X, CLOSE, X]),
    ],
)
def test_forced_tokens_follow_the_budget_and_the_waits(sampled, effort, want):
    assert run(sampled, effort) == want


def test_rows_that_did_not_open_a_thought_are_left_alone():
    assert run([X, CLOSE, X], Effort(0, num_waits=3), first_token=X) == [X, CLOSE, X]


def test_rows_are_forced_independently():
    state = effort_lib.init_state(jnp.array([OPEN, OPEN, X]), THINK)
    emitted = []
    for sampled in ([X, X, X], [X, CLOSE, CLOSE], [X, X, X], [X, X, X]):
        token, state = effort_lib.force(state, jnp.array(sampled), 3, 1, THINK)
        emitted.append(np.asarray(token).tolist())
    assert emitted == [[X, X, X], [X, W1, CLOSE], [X, W2, X], [CLOSE, CLOSE, X]]
    np.testing.assert_array_equal(state.spent, [3, 3, 0])


def test_effort_levels_resolve_by_name_and_reject_bad_values():
    assert effort_lib.resolve("instant") == Effort(0)
    assert effort_lib.resolve(Effort(7)) == Effort(7)
    with pytest.raises(ValueError, match="effort: 'extreme'"):
        effort_lib.resolve("extreme")
    with pytest.raises(ValueError, match="budget"):
        Effort(-1)


@pytest.mark.parametrize(
    "text,want",
    [
        ("<think>hmm</think><answer> 42 </answer><eos>", "42"),
        ("<answer>7</answer> then <answer>8</answer>", "7"),
        ("<think>no answer</think>", None),
        ("<answer>unterminated", None),
        ("</answer><answer>3</answer>", "3"),
    ],
)
def test_extract_answer_takes_the_first_closed_answer(text, want):
    assert extract_answer(text) == want


def test_extract_answer_applies_normalize():
    assert extract_answer("<answer> 0042 </answer>", lambda s: str(int(s))) == "42"


def test_majority_vote_counts_agreement_over_all_samples_and_breaks_ties_by_first_seen():
    vote = majority_vote(["3", None, "4", "3", "4", "5"])
    assert vote == Vote("3", 2, 6) and vote.agreement == pytest.approx(1 / 3)
    assert majority_vote([None, None]) == Vote(None, 0, 2)
    with pytest.raises(ValueError, match="answers"):
        majority_vote([])


class ScriptedSampler:
    """Completes each text with the next scripted completion; records the calls."""

    def __init__(self, completions):
        self.completions, self.calls = completions, []

    def complete(self, texts, **kwargs):
        self.calls.append((list(texts), kwargs))
        return self.completions[: len(texts)]


def test_self_consistency_votes_per_prompt_over_repeated_samples():
    completions = ["<answer>1</answer>", "<answer>2</answer>", "<answer> 2</answer>", "x",
                   "<answer>9</answer>", "<answer>9</answer>"]
    sampler = ScriptedSampler(completions)
    votes = self_consistency(sampler, ["a", "b"], 3, effort="low", normalize=str.strip)
    assert votes == [Vote("2", 2, 3), Vote("9", 2, 3)]
    assert sampler.calls == [(["a", "a", "a", "b", "b", "b"], {"effort": "low"})]
