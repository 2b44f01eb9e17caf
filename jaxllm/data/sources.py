"""Batches from documents: per-process shards, deterministic epochs, exact resumption.

A source has `tokenizer` and `batches(batch_size, seq_len, start=0, mask_prompt=False)`, which
yields this process's rows of each global batch (batch_size // jax.process_count() rows) as a
dict of numpy arrays: inputs, targets, segment_ids, positions, loss_mask (see `packing`). The
loop assembles the global batch with `jax.make_array_from_process_local_data`.

`start` is the number of batches already consumed: the stream from `start` equals the stream
from 0 with its first `start` batches dropped, so a checkpoint restores the data position by
its step alone. `mask_prompt=True` drops from the loss every target up to and including the
`<think>` token, so that SFT and RL train only on the worked solution and the answer; a
document without `<think>` keeps all its targets.
"""

import itertools
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data.packing import pack_row, plan_rows
from jaxllm.data.tokenizer import Tokenizer


def local_batch_size(batch_size: int) -> int:
    """The rows of each global batch that this process reads."""
    count = jax.process_count()
    if batch_size % count:
        raise ConfigError(f"train.batch_size: {batch_size} does not split over {count} processes")
    return batch_size // count


def local_rows(batch_size: int, start: int) -> Iterator[range]:
    """The global row indices of this process's part of batches start, start + 1, ..."""
    local = local_batch_size(batch_size)
    for step in itertools.count(start):
        first = step * batch_size + jax.process_index() * local
        yield range(first, first + local)


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


class DocumentSource:
    """In-memory documents (this process's shard), reshuffled each epoch, packed into rows.

    Epoch e visits the documents in the order of a permutation seeded by (seed, e). Documents
    longer than a row are cut into row-sized pieces.
    """

    def __init__(self, texts: Sequence[str], tokenizer: Tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.seed = seed
        think = tokenizer.special.get("<think>")
        self._docs, self._prompt_lengths = [], []
        for text in texts:
            doc = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
            self._docs.append(np.asarray(doc, np.int32))
            self._prompt_lengths.append(doc.index(think) + 1 if think in doc else 0)
        if not self._docs:
            raise ValueError("a DocumentSource needs at least one document")

    def __len__(self) -> int:
        return len(self._docs)

    def batches(
        self, batch_size: int, seq_len: int, start: int = 0, mask_prompt: bool = False
    ) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of batches `start`, `start + 1`, ..., endlessly."""
        local = local_batch_size(batch_size)
        rows = self._rows(seq_len, start * local, mask_prompt)
        while True:
            yield stack_rows([next(rows) for _ in range(local)])

    def _rows(self, seq_len: int, skip: int, mask_prompt: bool) -> Iterator[dict[str, np.ndarray]]:
        """Packed rows of epoch after epoch, from row `skip` on."""
        pieces, prompts = self._pieces(seq_len, mask_prompt)
        lengths = np.array([len(p) for p in pieces])
        pad = self.tokenizer.pad_id
        for epoch in itertools.count():
            order = np.random.default_rng((self.seed, epoch)).permutation(len(pieces))
            plan = plan_rows(lengths[order], seq_len)
            for first, stop in plan[skip:]:
                chosen = order[first:stop]
                yield pack_row(
                    [pieces[i] for i in chosen], seq_len, pad, [prompts[i] for i in chosen]
                )
            skip = max(0, skip - len(plan))

    def _pieces(self, seq_len: int, mask_prompt: bool) -> tuple[list[np.ndarray], list[int]]:
        """Documents cut into pieces of at most `seq_len`, with the prompt length of each."""
        pieces, prompts = [], []
        for doc, prompt in zip(self._docs, self._prompt_lengths):
            for offset in range(0, len(doc), seq_len):
                pieces.append(doc[offset:offset + seq_len])
                prompts.append(max(0, prompt - offset) if mask_prompt else 0)
        return pieces, prompts
