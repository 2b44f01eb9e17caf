"""Preference pairs: read from JSONL, tokenized, laid out as DPO batches.

Each line of a pairs file is a JSON object with three strings:

    {"prompt": "Q: 2+3=?\\n", "chosen": "5", "rejected": "6"}

or with the prompt as chat messages, `{"prompt": [{"role": "user", "content": ...}], ...}`.
A pair renders as the prompt's tokens, then a response's tokens and `<eos>`. A text prompt
renders as `chat_prompt` does (one user message through the tokenizer's chat template when it
has one, else `<bos>` and the text); a conversation as `chat.generation_prompt` does. A row longer than the batch's width loses the end of its response.

A batch of P pairs is 2P rows, right-padded: the P chosen rows, then the P rejected rows in the
same order. Each [2P, S] array is aligned with `tokens`: `response_mask[r, t]` is 1 where
token t of row r belongs to the response (its `<eos>` included), so the log-prob of token t
given the tokens before it counts.
"""

import dataclasses
import glob
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data import chat
from jaxllm.data.tokenizer import Tokenizer, chat_prompt

FIELDS = ("prompt", "chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference: a prompt, the preferred response and the dispreferred one."""

    prompt: str | tuple[dict, ...]  # a text, or chat messages
    chosen: str
    rejected: str
    where: str = ""  # "dpo.paths: pairs.jsonl:3", for errors


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    """A pair's token ids: the rendered prompt, and each response with its `<eos>`."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


def read_pairs(paths: str, field: str = "dpo.paths") -> list[Pair]:
    """The pairs of `paths` (comma-separated files or glob patterns), in file and line order.

    Raises ConfigError naming `field`, and the file and line of a bad pair.
    """
    files = []
    for pattern in (p.strip() for p in paths.split(",") if p.strip()):
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise ConfigError(f"{field}: {pattern!r} matches no file")
        files += matches
    pairs = [pair for path in files for pair in _file_pairs(Path(path), field)]
    if not pairs:
        raise ConfigError(f"{field}: {paths!r} holds no pairs")
    return pairs


def _file_pairs(path: Path, field: str) -> list[Pair]:
    pairs = []
    for number, line in enumerate(path.read_text().split("\n"), 1):
        if line.strip():
            pairs.append(parse_pair(line, f"{field}: {path}:{number}"))
    return pairs


def parse_pair(line: str, where: str) -> Pair:
    """The pair on one JSONL line; `where` ("dpo.paths: pairs.jsonl:3") heads any error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where} is not JSON ({error})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{where} is not a JSON object with the keys {list(FIELDS)}")
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), str):
            raise ConfigError(f"{where} has no string {key!r}")
        if not record[key].strip():
            raise ConfigError(f"{where} has an empty {key!r} response")
    return Pair(_prompt(record.get("prompt"), where), record["chosen"], record["rejected"],
                where=where)


def _prompt(prompt, where: str) -> str | tuple[dict, ...]:
    """A pair's prompt: a string, or chat messages that the assistant answers next."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        raise ConfigError(f"{where} has no string or list of messages 'prompt'")
    try:
        messages = chat.conversation({"messages": [*prompt, {"role": "assistant",
                                                             "content": ""}]})
    except ValueError as error:
        raise ConfigError(f"{where}: prompt: {error}") from None
    return tuple(messages[:-1])


def tokenize(pair: Pair, tokenizer: Tokenizer, seq_len: int) -> TokenizedPair:
    """The token ids of `pair`, rendered as the module docstring says. Raises ConfigError if
    the prompt leaves no room for a response in a row of `seq_len` tokens."""
    def response(text: str) -> tuple[int, ...]:
        return (*tokenizer.encode(text), tokenizer.eos_id)

    if isinstance(pair.prompt, str):
        prompt = tuple(chat_prompt(tokenizer, pair.prompt))
    else:
        prompt = tuple(chat.generation_prompt(tokenizer, list(pair.prompt)))
    if len(prompt) >= seq_len:
        raise ConfigError(f"{pair.where}: the prompt's {len(prompt)} tokens leave no room for "
                          f"a response in rows of train.seq_len={seq_len}")
    return TokenizedPair(prompt, response(pair.chosen), response(pair.rejected))


def _row(prompt: Sequence[int], response: Sequence[int], seq_len: int, pad_id: int
         ) -> dict[str, np.ndarray]:
    tokens = (list(prompt) + list(response))[:seq_len]
    real = len(tokens)
    column = np.arange(seq_len)
    return {
        "tokens": np.array(tokens + [pad_id] * (seq_len - real), np.int32),
        "positions": np.where(column < real, column, 0).astype(np.int32),
        "segment_ids": (column < real).astype(np.int32),
        "response_mask": ((column >= len(prompt)) & (column < real)).astype(np.int32),
    }


def batch(pairs: Sequence[TokenizedPair], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The [2P, seq_len] rows of P pairs: the chosen rows, then the rejected rows."""
    rows = [_row(p.prompt, p.chosen, seq_len, pad_id) for p in pairs]
    rows += [_row(p.prompt, p.rejected, seq_len, pad_id) for p in pairs]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}
