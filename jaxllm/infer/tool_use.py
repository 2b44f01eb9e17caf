"""Generation with tools: a host loop around the jitted decode loop of `sampler.generate`.

A row that emits `</tool>` stops; the host runs the call between its last `<tool>` and that
`</tool>` (`jaxllm.tools.Toolbox`), appends `<result>OUTPUT</result>` to the row, and the
next round resumes every paused row by prefilling its prompt, its tokens so far and the
result. Rows that ended (a stop token or the token budget) stay ended: they get a budget of
0 tokens. Each round is one call of the same compiled program: the batch size, the padded
context (prompt_len + max_new_tokens) and max_new_tokens never change, only traced values.

The jitted loop itself cannot run Python tools: that would need host callbacks, which
block the device at every call and do not shard. A row's k-th segment is always decoded in
round k, and its context is padded the same way whatever the other rows do, so a greedy
row's tokens equal those of a run of that row alone.
"""

import dataclasses
from collections.abc import Callable, Sequence

import flax.struct
import jax
import numpy as np

from jaxllm.infer.sampler import Sampler, generate, to_host
from jaxllm.tools import Toolbox


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call of a row: the text between `<tool>` and `</tool>`, and the tool's output."""

    row: int
    call: str
    output: str

    @property
    def failed(self) -> bool:
        return self.output.startswith("error:")


@flax.struct.dataclass
class ToolResult:
    """`GenerationResult`'s arrays (NumPy, [B, N]) and what the tools wrote.

    tool_mask: 1 on the `<result>...</result>` tokens a tool wrote (log-prob 0), else 0.
    calls: per row, its calls in order.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    tool_mask: np.ndarray
    calls: tuple[tuple[ToolCall, ...], ...] = flax.struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class ToolTokens:
    """The ids of `<tool>`, `</tool>`, `<result>` and `</result>`, and all special ids."""

    open: int
    close: int
    result_open: int
    result_close: int
    special: frozenset[int]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ToolTokens":
        names = ("<tool>", "</tool>", "<result>", "</result>")
        missing = [name for name in names if name not in tokenizer.special]
        if missing:
            raise ValueError(f"tools: the vocabulary has no {', '.join(missing)} tokens")
        return cls(*(tokenizer.special[name] for name in names),
                   frozenset(tokenizer.special.values()))


def run_call(toolbox: Toolbox, tokenizer, generated: Sequence[int], marks: ToolTokens, *,
             calls_before: int, max_calls: int) -> tuple[str, str]:
    """(call, output) of the call that `generated` ends with: the text between its last
    `<tool>` after any earlier `</tool>` and its last token, `</tool>`. An error output,
    without running anything, once the row has made `max_calls` calls."""
    if calls_before >= max_calls:
        return "", f"error: at most {max_calls} tool calls"
    ends = [i for i, token in enumerate(generated[:-1]) if token == marks.close]
    begin = ends[-1] + 1 if ends else 0  # after the previous call
    starts = [i for i in range(begin, len(generated) - 1) if generated[i] == marks.open]
    if not starts:
        return "", "error: the call has no opening tool token"
    call = tokenizer.decode(list(generated[starts[-1] + 1:-1]))
    return call, toolbox.call(call)


def result_tokens(output: str, tokenizer, marks: ToolTokens) -> list[int]:
    """`<result>OUTPUT</result>`; an output that spells a control token is refused, so a tool
    cannot inject `</result>`, `<answer>` or the like."""
    encoded = tokenizer.encode(output)
    if any(token in marks.special for token in encoded):
        encoded = tokenizer.encode("error: the output holds a control token")
    return [marks.result_open, *encoded, marks.result_close]


def generate_with_tools(
    model,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    tokenizer,
    toolbox: Toolbox,
    max_new_tokens: int,
    max_calls: int = 4,
    stop_ids: Sequence[int] = (),
    rng: jax.Array | None = None,
    prompt_len: int | None = None,
    on_call: Callable[[ToolCall], None] | None = None,
    **sampling,
) -> ToolResult:
    """`sampler.generate` with tool calls: at most `max_new_tokens` tokens per row, tool
    results included, and at most `max_calls` calls per row (later ones get an error result).

    `sampling` holds `generate`'s temperature, top_k, top_p, moe_bias and pad_id. Round r
    samples with `fold_in(rng, r)`. `on_call` sees each call as soon as its tool returns.
    """
    marks = ToolTokens.from_tokenizer(tokenizer)
    context_len = (prompt_len or max(len(p) for p in prompts)) + max_new_tokens
    rows = [_Row() for _ in prompts]
    for round_ in range(max_new_tokens):
        budgets = [max_new_tokens - len(row.tokens) if row.live else 0 for row in rows]
        if not any(budgets):
            break
        result = to_host(generate(
            model, params, [list(p) + row.tokens for p, row in zip(prompts, rows)],
            max_new_tokens=max_new_tokens, stop_ids=(*stop_ids, marks.close),
            rng=None if rng is None else jax.random.fold_in(rng, round_),
            prompt_len=context_len, budgets=budgets, **sampling,
        ))
        for index, row in enumerate(rows):
            if not budgets[index]:
                continue
            length = int(result.lengths[index])
            row.extend(result.tokens[index, :length], result.logprobs[index, :length], False)
            if not length or row.tokens[-1] != marks.close or len(row.tokens) >= max_new_tokens:
                row.live = False
                continue
            call, output = run_call(toolbox, tokenizer, row.tokens, marks,
                                    calls_before=len(row.calls), max_calls=max_calls)
            row.calls.append(ToolCall(index, call, output))
            if on_call is not None:
                on_call(row.calls[-1])
            added = result_tokens(output, tokenizer, marks)[:max_new_tokens - len(row.tokens)]
            row.extend(added, np.zeros(len(added)), True)
            row.live = len(row.tokens) < max_new_tokens
    return _stack(rows, max_new_tokens, sampling.get("pad_id", 0))


@dataclasses.dataclass
class _Row:
    """One row's tokens so far, their log-probs, which ones a tool wrote, and its calls."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    from_tool: list[bool] = dataclasses.field(default_factory=list)
    calls: list[ToolCall] = dataclasses.field(default_factory=list)
    live: bool = True

    def extend(self, tokens, logprobs, from_tool: bool) -> None:
        self.tokens += [int(t) for t in tokens]
        self.logprobs += [float(p) for p in logprobs]
        self.from_tool += [from_tool] * len(tokens)


def _stack(rows: list[_Row], width: int, pad_id: int) -> ToolResult:
    tokens = np.full((len(rows), width), pad_id, np.int32)
    logprobs = np.zeros((len(rows), width), np.float32)
    tool_mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        n = len(row.tokens)
        tokens[i, :n], logprobs[i, :n], tool_mask[i, :n] = row.tokens, row.logprobs, row.from_tool
    return ToolResult(tokens, logprobs, np.array([len(r.tokens) for r in rows], np.int32),
                      tool_mask, tuple(tuple(r.calls) for r in rows))


class ToolSampler(Sampler):
    """A `Sampler` whose `generate` lets the model call the tools of `toolbox`."""

    def __init__(self, model, params, tokenizer, *, toolbox: Toolbox, max_calls: int = 4,
                 **kwargs):
        super().__init__(model, params, tokenizer, **kwargs)
        self.toolbox, self.max_calls = toolbox, max_calls

    def generate(self, prompts: Sequence[Sequence[int]], *, effort=None, think=None,
                 **kwargs) -> ToolResult:
        """`generate_with_tools`; stops at `<eos>` unless `stop_ids` is given. Budget forcing
        (`effort`) does not combine with tools."""
        if effort is not None or think is not None:
            raise ValueError("effort: budget forcing does not combine with tools")
        kwargs.setdefault("stop_ids", (self.tokenizer.eos_id,))
        kwargs.setdefault("pad_id", self.tokenizer.pad_id)
        return generate_with_tools(
            self.model, self.params, prompts, tokenizer=self.tokenizer, toolbox=self.toolbox,
            max_calls=self.max_calls, moe_bias=self.moe_bias, **kwargs,
        )
