"""Dropless routed experts for backends without a grouped-matmul kernel: a loop over tiles.

The token-choices, sorted by expert, are cut into tiles of rows that each belong to one
expert, and a `lax.fori_loop` whose trip count is the number of tiles in use runs one dense
SwiGLU per tile. Nothing is computed for padding that no routing fills, unlike a static
block layout. Each tile gathers its tokens from x and adds its weighted output straight
into y, so no [k*T, D] copy of the tokens is ever made.

Tiles come in levels of halving size: each expert's rows are first covered by whole tiles
of the largest size, then its remainder by at most one tile of each smaller size, and the
smallest level rounds up. So an expert wastes fewer than `min_tile` rows, and most of the
work runs in large, efficient matmuls. Rows past a tile's valid count are masked to zero.

Loops cannot be differentiated in reverse mode, so the VJP is written by hand: a second
tile loop that computes dx and accumulates each expert's kernel gradients.
"""

import functools

import jax
import jax.numpy as jnp


def tile_sizes(rows: int, num_experts: int) -> tuple[int, int]:
    """(largest, smallest) tile: the power of two at or below the mean group size, in
    [8, 1024] and at most `rows`; the smallest at most 128 rows."""
    def floor_pow2(n: int) -> int:
        return 1 << (max(1, n).bit_length() - 1)

    tile = min(floor_pow2(min(1024, max(8, rows // num_experts))), floor_pow2(rows))
    return tile, min(tile, 128)


def _levels(tile: int, min_tile: int) -> list[int]:
    return [tile >> i for i in range((tile // min_tile).bit_length())]


def _visits(group_sizes, sizes: list[int], level: int, max_visits: int):
    """The tiles of one level: per visit (expert, first row, valid rows), and their count.

    Level i covers rows [n // sizes[i-1] * sizes[i-1], n // sizes[i] * sizes[i]) of an
    expert with n rows; the last level covers up to n and rounds its tile count up.
    """
    size = sizes[level]
    low = 0 if level == 0 else group_sizes // sizes[level - 1] * sizes[level - 1]
    high = group_sizes if level == len(sizes) - 1 else group_sizes // size * size
    counts = (high - low + size - 1) // size
    ends = jnp.cumsum(counts)
    visit = jnp.arange(max_visits)
    expert = jnp.searchsorted(ends, visit, side="right")
    expert = jnp.minimum(expert, group_sizes.shape[0] - 1)
    index = visit - (ends - counts)[expert]
    first = (jnp.cumsum(group_sizes) - group_sizes + low)[expert] + index * size
    return expert, first, (high - low)[expert] - index * size, ends[-1]


def _tile_loop(body, carry, group_sizes, rows: int, tile: int, min_tile: int):
    """carry after body(size, expert, first row, row mask [size, 1], carry) on every tile of
    the `rows` sorted rows. A tile that would run past the last row starts earlier instead,
    its mask shifted to match, so no array needs padding."""
    sizes = _levels(tile, min_tile)
    for level, size in enumerate(sizes):
        max_visits = rows // size + group_sizes.shape[0]
        expert, first, valid, count = _visits(group_sizes, sizes, level, max_visits)

        def step(v, carry, size=size, expert=expert, first=first, valid=valid):
            start = jnp.minimum(first[v], rows - size)
            index = jnp.arange(size) + start - first[v]
            mask = (index >= 0) & (index < valid[v])
            return body(size, expert[v], start, mask[:, None], carry)

        carry = jax.lax.fori_loop(0, count, step, carry)
    return carry


def _rows(array, first, size):
    return jax.lax.dynamic_slice_in_dim(array, first, size)


def _add_rows(array, rows, first):
    """array with `rows` added at row `first` (tiles overhang into their neighbours' rows)."""
    return jax.lax.dynamic_update_slice_in_dim(
        array, _rows(array, first, rows.shape[0]) + rows, first, 0
    )


def _outer(a, b):
    """a.T @ b in float32: kernel gradients accumulate over many tiles."""
    return jnp.matmul(a.T, b, preferred_element_type=jnp.float32)


def _forward(x, tokens, weights, group_sizes, wi, wo, tile, min_tile):
    """(y [T, D], gate and up projections of the rows [M, 2F]) of `tiled_moe`."""
    rows = tokens.shape[0]
    num_experts, embed, _, hidden = wi.shape
    wi = wi.reshape(num_experts, embed, 2 * hidden)

    def body(size, expert, first, mask, carry):
        y, gate_up = carry
        row_tokens = _rows(tokens, first, size)
        tile_gate_up = (x[row_tokens] * mask) @ wi[expert]  # masked rows: zeros from here on
        hidden_rows = jax.nn.silu(tile_gate_up[:, :hidden]) * tile_gate_up[:, hidden:]
        row_weights = _rows(weights, first, size)[:, None]
        y = y.at[row_tokens].add((hidden_rows @ wo[expert]) * row_weights)
        return y, _add_rows(gate_up, tile_gate_up, first)

    # zeros_like, not zeros: inside shard_map the carry must vary over the mesh like x.
    init = (jnp.zeros_like(x), jnp.zeros_like(x, shape=(rows, 2 * hidden)))
    return _tile_loop(body, init, group_sizes, rows, tile, min_tile)


def _varying_axes(array) -> frozenset:
    """The mesh axes `array` varies over inside shard_map (`.mat.varying` from jax 0.10)."""
    aval = jax.typeof(array)
    return aval.mat.varying if hasattr(aval, "mat") else aval.vma


def tiled_moe(x, tokens, weights, group_sizes, wi, wo, tile: int, min_tile: int):
    """sum over rows r of weights[r] * SwiGLU_e(r)(x[tokens[r]]), added into row tokens[r].

    Args:
      x: [T, D] tokens.
      tokens, weights: [M] the token and combine weight of each row (token-choice), the rows
        sorted by expert.
      group_sizes: [E] rows per expert.
      wi, wo: [E, D, 2, F] and [E, F, D] expert kernels.
      tile, min_tile: the largest and smallest tile, powers of two (`tile_sizes`).

    Returns:
      [T, D].
    """
    # Inside shard_map the kernels must vary over the mesh axes the tokens vary over, so that
    # their per-shard gradients are summed over those axes by autodiff of the cast.
    axes = tuple(_varying_axes(x) - _varying_axes(wi))
    if axes:
        wi, wo = jax.lax.pcast((wi, wo), axes, to="varying")
    return _tiled_moe(x, tokens, weights, group_sizes, wi, wo, tile, min_tile)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _tiled_moe(x, tokens, weights, group_sizes, wi, wo, tile, min_tile):
    return _forward(x, tokens, weights, group_sizes, wi, wo, tile, min_tile)[0]


def _tiled_moe_fwd(x, tokens, weights, group_sizes, wi, wo, tile, min_tile):
    y, gate_up = _forward(x, tokens, weights, group_sizes, wi, wo, tile, min_tile)
    return y, (x, tokens, weights, group_sizes, wi, wo, gate_up)


def _tiled_moe_bwd(tile, min_tile, residuals, dy):
    x, tokens, weights, group_sizes, wi, wo, gate_up = residuals
    rows = tokens.shape[0]
    num_experts, embed, _, hidden = wi.shape
    wi_flat = wi.reshape(num_experts, embed, 2 * hidden)

    def body(size, expert, first, mask, carry):
        dx, d_weights, dwi, dwo = carry
        row_tokens = _rows(tokens, first, size)
        tile_gate_up = _rows(gate_up, first, size) * mask  # masked rows get zero gradients
        gate, up = tile_gate_up[:, :hidden], tile_gate_up[:, hidden:]
        sigmoid = jax.nn.sigmoid(gate)
        silu = gate * sigmoid
        hidden_rows = silu * up
        dy_rows = dy[row_tokens]
        out = hidden_rows @ wo[expert]  # recomputed: cheaper than saving [M, D]
        d_weights = _add_rows(d_weights, jnp.sum(out * dy_rows, axis=1), first)
        d_out = dy_rows * _rows(weights, first, size)[:, None]
        d_hidden = d_out @ wo[expert].T
        d_gate_up = jnp.concatenate(
            [d_hidden * up * sigmoid * (1 + gate * (1 - sigmoid)), d_hidden * silu], axis=1
        )
        dx = dx.at[row_tokens].add(d_gate_up @ wi_flat[expert].T)
        dwi = dwi.at[expert].add(_outer(x[row_tokens], d_gate_up))
        dwo = dwo.at[expert].add(_outer(hidden_rows, d_out))
        return dx, d_weights, dwi, dwo

    f32 = jnp.float32
    init = (jnp.zeros_like(x), jnp.zeros_like(weights), jnp.zeros_like(wi_flat, f32),
            jnp.zeros_like(wo, f32))
    dx, d_weights, dwi, dwo = _tile_loop(body, init, group_sizes, rows, tile, min_tile)
    return dx, None, d_weights, None, dwi.reshape(wi.shape).astype(wi.dtype), dwo.astype(wo.dtype)


_tiled_moe.defvjp(_tiled_moe_fwd, _tiled_moe_bwd)
