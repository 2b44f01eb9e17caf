"""Packing of tokenized documents into fixed-length rows."""

from collections.abc import Iterable, Iterator

import numpy as np


def pack(documents: Iterable[list[int]], seq_len: int, pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """Packs whole documents greedily into rows of `seq_len` tokens.

    A document that does not fit in the rest of a row starts the next row (longer ones are
    truncated). Yields one row at a time, with:
      inputs:      token ids;
      targets:     the next token of the same document;
      segment_ids: 1, 2, ... per document in the row, 0 on padding;
      positions:   the position of each token within its own document;
      loss_mask:   1 where `targets` is a real next token of the same document.
    """
    tokens, segments, positions = [], [], []
    for doc in documents:
        doc = doc[:seq_len]
        if len(tokens) + len(doc) > seq_len:
            yield _row(tokens, segments, positions, seq_len, pad_id)
            tokens, segments, positions = [], [], []
        segment = (segments[-1] if segments else 0) + 1
        tokens += doc
        segments += [segment] * len(doc)
        positions += range(len(doc))


def _row(tokens, segments, positions, seq_len, pad_id) -> dict[str, np.ndarray]:
    pad = seq_len - len(tokens)
    inputs = np.array(tokens + [pad_id] * pad, dtype=np.int32)
    segment_ids = np.array(segments + [0] * pad, dtype=np.int32)
    targets = np.append(inputs[1:], pad_id).astype(np.int32)
    same_doc = np.append(segment_ids[1:] == segment_ids[:-1], False)
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": np.array(positions + [0] * pad, dtype=np.int32),
        "loss_mask": (same_doc & (segment_ids > 0)).astype(np.float32),
    }
