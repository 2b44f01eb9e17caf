"""A small deterministic corpus of bare arithmetic problems, generated in memory.

It needs no files, no network and no TensorFlow, and a tiny model visibly learns it: the
format is predictable at once, and the answers are learnable.
"""

import zlib
from collections.abc import Iterator, Sequence

import numpy as np

from jaxllm.data.packing import pack
from jaxllm.data.sources import local_rows, stack_rows
from jaxllm.data.tokenizer import ByteTokenizer


def problems(seed: int | Sequence[int]) -> Iterator[str]:
    """An endless, seeded stream like '417+86=503' or '23*7=161'."""
    rng = np.random.default_rng(seed)
    while True:
        a, b = (int(x) for x in rng.integers(0, 1000, size=2))
        op = "+-*"[int(rng.integers(3))]
        if op == "*":
            b %= 100
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        yield f"{a}{op}{b}={result}"


class ArithmeticSource:
    """Batches of packed arithmetic problems.

    Row r of the global stream is packed from `problems((seed, split, r))`, so every row, and
    so every batch, is a function of the seed and its index alone.
    """

    def __init__(self, seed: int = 0, split: str = "train"):
        self.seed = seed
        self.split = split
        self.tokenizer = ByteTokenizer()

    def batches(
        self, batch_size: int, seq_len: int, start: int = 0, mask_prompt: bool = False
    ) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of batches `start`, `start + 1`, ... (no prompt to mask here)."""
        del mask_prompt  # bare problems have no <think> prompt boundary
        for rows in local_rows(batch_size, start):
            yield stack_rows([self._row(r, seq_len) for r in rows])

    def _row(self, index: int, seq_len: int) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        stream = problems((self.seed, zlib.crc32(self.split.encode()), index))
        docs = ([tok.bos_id, *tok.encode(text), tok.eos_id] for text in stream)
        return next(pack(docs, seq_len, tok.pad_id))
