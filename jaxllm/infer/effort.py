"""Reasoning effort: s1-style budget forcing of `<think> ... </think>` inside the decode loop.

A row is thinking from a `<think>` (its prompt usually ends with one) until `</think>`.
Each effort level caps the thinking tokens of a row: once the budget is spent, the next
token is forced to `</think>`, so a row never thinks for more than `budget` tokens (and
`instant`, budget 0, closes the thought at once). With `num_waits` > 0 an early `</think>`
is suppressed and replaced by the "Wait" tokens, up to `num_waits` times per row (s1's
forced extension). `auto` lets the model decide, under a hard cap.

Each row of a batch may have its own effort: the loop traces [B] budgets and wait counts.
A prompt can also name its level with a control token (`control_token`), which a model
learns to follow without forcing (effort-conditioned GRPO, docs/rl.md).
"""

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ThinkTokens:
    """The ids that delimit a thought, and the tokens that extend one."""

    open: int
    close: int
    wait: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(cls, tokenizer, wait_text: str = " Wait") -> "ThinkTokens":
        special = tokenizer.special
        return cls(special["<think>"], special["</think>"], tuple(tokenizer.encode(wait_text)))


@dataclasses.dataclass(frozen=True)
class Effort:
    """A thinking-token budget, and how many early `</think>` to replace by "Wait".

    The decode loop traces both numbers, so a sweep over effort levels compiles once.
    """

    budget: int
    num_waits: int = 0

    def __post_init__(self):
        if self.budget < 0:
            raise ValueError(f"budget: must be >= 0 thinking tokens, got {self.budget}")
        if self.num_waits < 0:
            raise ValueError(f"num_waits: must be >= 0, got {self.num_waits}")


EFFORTS = {
    "instant": Effort(0),
    "low": Effort(32),
    "medium": Effort(128),
    "high": Effort(512, num_waits=2),
    "auto": Effort(4096),
}


def control_token(level: str) -> str:
    """The prompt token that asks for effort `level`: "<effort:low>"."""
    return f"<effort:{level}>"


def per_row(effort: Effort | Sequence[Effort], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """[rows] budgets and [rows] wait counts: one `Effort` for every row, or one per row."""
    efforts = [effort] * rows if isinstance(effort, Effort) else list(effort)
    if len(efforts) != rows:
        raise ValueError(f"effort: {len(efforts)} efforts for {rows} rows")
    return (np.array([e.budget for e in efforts], np.int32),
            np.array([e.num_waits for e in efforts], np.int32))


def resolve(effort: str | Effort, levels: dict[str, Effort] = EFFORTS) -> Effort:
    """An `Effort`, or the name of one of `levels`."""
    if isinstance(effort, Effort):
        return effort
    if effort not in levels:
        raise ValueError(f"effort: {effort!r} is not one of {sorted(levels)} or an Effort")
    return levels[effort]


@flax.struct.dataclass
class EffortState:
    """Per row [B]: inside a thought, thinking tokens spent, waits used, and the index of the
    next "Wait" token to force (len(wait) when none is being forced)."""

    thinking: jax.Array
    spent: jax.Array
    waits: jax.Array
    wait_pos: jax.Array


def init_state(last_prompt_token: jax.Array, tokens: ThinkTokens) -> EffortState:
    """Rows whose prompt ends with `<think>` start thinking."""
    zeros = jnp.zeros(last_prompt_token.shape, jnp.int32)
    return EffortState(last_prompt_token == tokens.open, zeros, zeros, zeros + len(tokens.wait))


def force(
    state: EffortState, sampled: jax.Array, budget, num_waits, tokens: ThinkTokens
) -> tuple[jax.Array, EffortState]:
    """The token each row emits instead of `sampled` [B], and the next state, under an
    `Effort(budget, num_waits)` (scalars or [B] per row, traced or not).

    Priority: an exhausted budget forces `</think>`; then a "Wait" in progress continues;
    then an early `</think>` with waits left starts a "Wait".
    """
    num_wait = len(tokens.wait)
    over_budget = state.thinking & (state.spent >= budget)
    in_wait = ~over_budget & (state.wait_pos < num_wait)
    start_wait = (
        ~over_budget & ~in_wait & state.thinking & (sampled == tokens.close)
        & (state.waits < num_waits) & (num_wait > 0)
    )
    wait_ids = jnp.asarray(tokens.wait or (tokens.close,), jnp.int32)
    token = jnp.where(in_wait, wait_ids[jnp.minimum(state.wait_pos, num_wait - 1)], sampled)
    token = jnp.where(start_wait, wait_ids[0], token)
    token = jnp.where(over_budget, tokens.close, token)
    wait_pos = jnp.where(in_wait, state.wait_pos + 1, num_wait)
    wait_pos = jnp.where(start_wait, 1, wait_pos)
    thinking = jnp.where(token == tokens.open, True, state.thinking & (token != tokens.close))
    return token, EffortState(
        thinking,
        state.spent + (state.thinking & (token != tokens.close)),
        state.waits + start_wait,
        wait_pos,
    )
