"""Batches from documents: per-process shards, deterministic epochs, exact resumption.

A source has `tokenizer` and `batches(batch_size, seq_len, start=0, mask_prompt=False)`, which
yields this process's rows of each global batch (batch_size // jax.process_count() rows) as a
dict of numpy arrays: inputs, targets, segment_ids, positions, loss_mask (see `packing`), and
`patches` for a source of documents with images (`image_sources`). The loop assembles the
global batch with `jax.make_array_from_process_local_data`.

`start` is the number of batches already consumed: the stream from `start` equals the stream
from 0 with its first `start` batches dropped, so a checkpoint restores the data position by
its step alone. For a `DocumentSource`, `mask_prompt=True` drops from the loss every target up
to and including the `<think>` token, to train only on the worked solution and the answer; a
document without `<think>` keeps all its targets. A `ChatSource` trains only on assistant
tokens (`chat`).
"""

import itertools
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data import chat
from jaxllm.data.packing import pack_patches, pack_row, plan_rows
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


def encode_document(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of one document: `<bos>`, the text, `<eos>`."""
    return [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]


def prompt_length(tokenizer: Tokenizer, doc: np.ndarray) -> int:
    """The tokens of `doc` up to and including its first `<think>`; 0 without one."""
    found = np.flatnonzero(doc == tokenizer.special.get("<think>", -1))
    return int(found[0]) + 1 if len(found) else 0


class DocumentSource:
    """In-memory documents (this process's shard), reshuffled each epoch, packed into rows
    (`packed_batches`)."""

    def __init__(self, texts: Sequence[str], tokenizer: Tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.seed = seed
        self._docs = [np.asarray(encode_document(tokenizer, text), np.int32) for text in texts]
        self._prompt_lengths = [prompt_length(tokenizer, doc) for doc in self._docs]
        if not self._docs:
            raise ValueError("a DocumentSource needs at least one document")

    def __len__(self) -> int:
        return len(self._docs)

    def batches(
        self, batch_size: int, seq_len: int, start: int = 0, mask_prompt: bool = False
    ) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of batches `start`, `start + 1`, ..., endlessly."""
        masks = [np.arange(len(doc)) >= (prompt if mask_prompt else 0)
                 for doc, prompt in zip(self._docs, self._prompt_lengths)]
        return packed_batches(self._docs, masks, pad_id=self.tokenizer.pad_id, seed=self.seed,
                              batch_size=batch_size, seq_len=seq_len, start=start)


class ChatSource:
    """Conversations (this process's shard) rendered with their assistant masks (`chat`),
    reshuffled each epoch, packed into rows (`packed_batches`). Only assistant tokens are
    targets."""

    def __init__(self, conversations: Sequence[list[dict]], tokenizer: Tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.seed = seed
        self._docs, self._masks = [], []
        for number, messages in enumerate(conversations):
            try:
                ids, mask = chat.render(tokenizer, messages)
            except ValueError as error:
                raise ValueError(f"conversation {number}: {error}") from None
            self._docs.append(np.asarray(ids, np.int32))
            self._masks.append(np.asarray(mask, bool))
        if not self._docs:
            raise ValueError("a ChatSource needs at least one conversation")

    def __len__(self) -> int:
        return len(self._docs)

    def batches(
        self, batch_size: int, seq_len: int, start: int = 0, mask_prompt: bool = False
    ) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of batches `start`, `start + 1`, ..., endlessly; the loss
        is on assistant tokens whatever `mask_prompt` says."""
        del mask_prompt  # every non-assistant token is a prompt
        return packed_batches(self._docs, self._masks, pad_id=self.tokenizer.pad_id,
                              seed=self.seed, batch_size=batch_size, seq_len=seq_len, start=start)


def packed_batches(
    documents: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, pad_id: int, seed: int,
    batch_size: int, seq_len: int, start: int, patches: Sequence[np.ndarray] | None = None,
    max_patches: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of batches `start`, `start + 1`, ... of `documents`, endlessly.

    Epoch e visits the documents in the order of a permutation seeded by (seed, e). Documents
    longer than a row are cut into row-sized pieces. `masks[i]` marks the tokens of document i
    that may be targets. With `patches`, `patches[i]` holds the image patches of document i
    (uint8 [k_i, d]; a document with any must fit in a row), each row holds at most
    `max_patches` of them, and batches carry them as `patches` (`packing.pack_patches`).
    """
    local = local_batch_size(batch_size)
    rows = _rows(documents, masks, pad_id=pad_id, seed=seed, seq_len=seq_len,
                 skip=start * local, patches=patches, max_patches=max_patches)
    while True:
        yield stack_rows([next(rows) for _ in range(local)])


def _rows(documents: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, pad_id: int,
          seed: int, seq_len: int, skip: int, patches: Sequence[np.ndarray] | None,
          max_patches: int) -> Iterator[dict[str, np.ndarray]]:
    """Packed rows of epoch after epoch, from row `skip` on."""
    pieces, piece_masks, piece_patches = [], [], []
    for i, (doc, mask) in enumerate(zip(documents, masks)):
        for offset in range(0, len(doc), seq_len):
            pieces.append(doc[offset:offset + seq_len])
            piece_masks.append(mask[offset:offset + seq_len])
            if patches is not None:
                piece_patches.append(patches[i][:0] if offset else patches[i])
    lengths = np.array([len(p) for p in pieces])
    counts = np.array([len(p) for p in piece_patches] if patches is not None else
                      [0] * len(pieces))
    for epoch in itertools.count():
        order = np.random.default_rng((seed, epoch)).permutation(len(pieces))
        plan = plan_rows(lengths[order], seq_len, patch_counts=counts[order],
                         max_patches=max_patches)
        for first, stop in plan[skip:]:
            chosen = order[first:stop]
            row = pack_row([pieces[i] for i in chosen], seq_len, pad_id,
                           [piece_masks[i] for i in chosen])
            if patches is not None:
                row["patches"] = pack_patches([piece_patches[i] for i in chosen], max_patches)
            yield row
        skip = max(0, skip - len(plan))
