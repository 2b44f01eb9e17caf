"""Token orders for context parallelism, applied in the data path.

Ring attention splits the sequence axis into n contiguous shards, one per device of the
`context` axis. Under a causal mask the plain order leaves the first device mostly idle, so the
batch is permuted before the model sees it (`docs/references.md`, "Causal load balance"):

- zigzag (dual-chunk-swap): 2n chunks, device r holds chunks r and 2n-1-r;
- striped: device r holds tokens r, r+n, r+2n, ...

Tokens, positions and segment ids are permuted together, so RoPE and the masks see the true
positions; per-token outputs (logits, losses) go back with `from_context_order`.
"""

from typing import Literal

import jax
import numpy as np

Order = Literal["plain", "zigzag", "striped"]
ORDERS: tuple[Order, ...] = ("plain", "zigzag", "striped")


def zigzag_permutation(length: int, n: int) -> np.ndarray:
    """Indices into the sequence: device r's shard holds chunks r and 2n-1-r of 2n chunks.

    For length 8 and n = 2: [0, 1, 6, 7, 2, 3, 4, 5].
    """
    _check_divides(length, 2 * n, "zigzag")
    chunks = np.arange(length).reshape(2 * n, length // (2 * n))
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * n - 1 - r]]) for r in range(n)])


def striped_permutation(length: int, n: int) -> np.ndarray:
    """Indices into the sequence: device r's shard holds tokens r, r+n, r+2n, ..."""
    _check_divides(length, n, "striped")
    return np.arange(length).reshape(length // n, n).T.reshape(-1)


def permutation(order: Order, length: int, n: int) -> np.ndarray:
    """[length] indices: position p of the reordered sequence holds original token perm[p]."""
    if order == "plain":
        _check_divides(length, n, "plain")
        return np.arange(length)
    if order == "zigzag":
        return zigzag_permutation(length, n)
    if order == "striped":
        return striped_permutation(length, n)
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def to_context_order(tree, perm: np.ndarray):
    """Permutes axis 1 ([B, S, ...]) of every array in `tree` into the context order.

    numpy arrays stay numpy (the host data path), jax arrays stay jax.
    """
    return jax.tree.map(lambda x: x[:, perm], tree)


def from_context_order(tree, perm: np.ndarray):
    """The inverse of `to_context_order`: axis 1 back in the original token order."""
    return jax.tree.map(lambda x: x[:, np.argsort(perm)], tree)


def _check_divides(length: int, parts: int, order: str) -> None:
    if length % parts:
        raise ValueError(f"{order} order: sequence length {length} is not a multiple of {parts}")
