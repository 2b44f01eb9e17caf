"""Packing of tokenized documents into fixed-length rows.

A row holds whole documents back to back, then padding, as numpy arrays:
  inputs:      token ids;
  targets:     the next token of the same document;
  segment_ids: 1, 2, ... per document in the row, 0 on padding;
  positions:   the position of each token within its own document;
  loss_mask:   1 where `targets` is a real next token of the same document that its target
               mask trains on (every token past the prompt, or every assistant token);
and, for documents with images (`pack_patches`):
  patches:     the rows' image patches in token order, zero-padded to a fixed count.
"""

from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def pack(
    documents: Iterable[Sequence[int]], seq_len: int, pad_id: int
) -> Iterator[dict[str, np.ndarray]]:
    """Packs a stream of documents greedily; one longer than `seq_len` is truncated.

    A document that does not fit in the rest of a row starts the next row.
    """
    row = []
    for doc in documents:
        doc = doc[:seq_len]
        if sum(map(len, row)) + len(doc) > seq_len:
            yield pack_row(row, seq_len, pad_id)
            row = []
        row.append(doc)


def plan_rows(
    lengths: Sequence[int], seq_len: int, *, patch_counts: Sequence[int] | None = None,
    max_patches: int = 0,
) -> list[tuple[int, int]]:
    """Greedy packing of documents of these lengths (each <= seq_len), in order.

    Returns each row as the half-open range [first, stop) of the documents it holds; the
    same rows `pack` makes of the same documents. With `patch_counts` (each <= max_patches),
    a row also holds at most `max_patches` image patches: a document whose images would not
    fit starts the next row, as one whose tokens would not.
    """
    counts = np.zeros(len(lengths), int) if patch_counts is None else patch_counts
    rows, first, used, patches = [], 0, 0, 0
    for i, (length, count) in enumerate(zip(lengths, counts)):
        if used + length > seq_len or patches + count > max_patches:
            rows.append((first, i))
            first, used, patches = i, 0, 0
        used += length
        patches += count
    if first < len(lengths):
        rows.append((first, len(lengths)))
    return rows


def pack_row(
    documents: Sequence[Sequence[int]],
    seq_len: int,
    pad_id: int,
    target_masks: Sequence[Sequence[bool]] | None = None,
) -> dict[str, np.ndarray]:
    """One row of `documents`, which must fit in `seq_len` tokens together.

    Token j of document i is a target only where `target_masks[i][j]` is true (default: every
    token is, beyond the first, which has no predecessor).
    """
    if target_masks is None:
        target_masks = [np.ones(len(d), bool) for d in documents]
    tokens = [t for doc in documents for t in doc]
    pad = seq_len - len(tokens)
    if pad < 0:
        raise ValueError(f"{len(tokens)} tokens do not fit in a row of {seq_len}")
    segments = np.repeat(np.arange(1, len(documents) + 1), [len(d) for d in documents])
    positions = np.concatenate([np.arange(len(d)) for d in documents] + [np.zeros(pad, int)])
    trained = np.concatenate([np.asarray(m, bool) for m in target_masks] + [np.zeros(pad, bool)])
    inputs = np.array(tokens + [pad_id] * pad, dtype=np.int32)
    segment_ids = np.concatenate([segments, np.zeros(pad, int)]).astype(np.int32)
    same_doc = np.append(segment_ids[1:] == segment_ids[:-1], False) & (segment_ids > 0)
    return {
        "inputs": inputs,
        "targets": np.append(inputs[1:], pad_id).astype(np.int32),
        "segment_ids": segment_ids,
        "positions": positions.astype(np.int32),
        "loss_mask": (same_doc & np.append(trained[1:], False)).astype(np.float32),
    }


def pack_patches(patches: Sequence[np.ndarray], max_patches: int) -> np.ndarray:
    """The documents' patches (uint8 pixels [k_i, d]) in order, as float32 in [0, 1],
    zero-padded to [max_patches, d]: patch k is that of the row's k-th `<patch>` token."""
    flat = np.concatenate(patches).astype(np.float32) / 255
    return np.pad(flat, ((0, max_patches - len(flat)), (0, 0)))
