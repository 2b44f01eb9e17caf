"""A small deterministic corpus of arithmetic problems, generated in memory.

It needs no files and no network, and a tiny model visibly learns it: the format is
predictable at once, and the answers are learnable.
"""

from collections.abc import Iterator

import numpy as np

from jaxllm.data.packing import pack
from jaxllm.data.tokenizer import ByteTokenizer


def problems(seed: int) -> Iterator[str]:
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
    """Batches of packed arithmetic problems, one deterministic stream per seed."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.tokenizer = ByteTokenizer()

    def batches(self, batch_size: int, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
        tok = self.tokenizer
        docs = ([tok.bos_id, *tok.encode(text), tok.eos_id] for text in problems(self.seed))
        rows = pack(docs, seq_len, tok.pad_id)
        while True:
            batch = [next(rows) for _ in range(batch_size)]
            yield {key: np.stack([row[key] for row in batch]) for key in batch[0]}
