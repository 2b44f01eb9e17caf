"""Dropless routed experts for backends without a grouped-matmul kernel: a loop over tiles.

The token-choices, sorted by expert, are cut into tiles of rows that each belong to one
expert, and a `lax.fori_loop` whose trip count is the number of tiles in use runs one dense
SwiGLU per tile. Nothing is computed for padding that no routing fills, unlike a static
block layout. Each tile gathers its tokens from x and adds its weighted output straight
into y, so no [k*T, D] copy of the tokens is ever made.

Each expert's rows are first spread to a region rounded up to whole `min_tile` rows; the
gap rows hold token 0 with weight 0, so they add nothing to y or to any gradient and no
tile needs a mask. Tiles come in levels of halving size: each region is covered by whole
tiles of the largest size, then by at most one tile of each smaller size. So an expert
wastes fewer than `min_tile` rows, and most of the work runs in large, efficient matmuls.

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


def _pad_groups(tokens, weights, group_sizes, min_tile: int):
    """(tokens, weights [P], group sizes [E]) with each group rounded up to whole `min_tile`
    rows by gap rows of token 0 and weight 0. P = M + E * (min_tile - 1) fits any routing."""
    rows, num_experts = tokens.shape[0], group_sizes.shape[0]
    padded_sizes = (group_sizes + min_tile - 1) // min_tile * min_tile
    expert = jnp.repeat(jnp.arange(num_experts), group_sizes, total_repeat_length=rows)
    shift = jnp.cumsum(padded_sizes - group_sizes) - (padded_sizes - group_sizes)
    dest = jnp.arange(rows) + shift[expert]
    shape = (rows + num_experts * (min_tile - 1),)
    # zeros_like, not zeros: inside shard_map they must vary over the mesh like the rows.
    tokens = jnp.zeros_like(tokens, shape=shape).at[dest].set(tokens, unique_indices=True)
    weights = jnp.zeros_like(weights, shape=shape).at[dest].set(weights, unique_indices=True)
    return tokens, weights, padded_sizes


def _levels(tile: int, min_tile: int) -> list[int]:
    return [tile >> i for i in range((tile // min_tile).bit_length())]


def _visits(group_sizes, sizes: list[int], level: int, max_visits: int):
    """The tiles of one level: per visit (expert, first row), and their count.

    Level i covers rows [n // sizes[i-1] * sizes[i-1], n // sizes[i] * sizes[i]) of an
    expert with n rows, a multiple of the smallest size.
    """
    size = sizes[level]
    low = 0 if level == 0 else group_sizes // sizes[level - 1] * sizes[level - 1]
    counts = group_sizes // size - low // size
    ends = jnp.cumsum(counts)
    visit = jnp.arange(max_visits)
    expert = jnp.searchsorted(ends, visit, side="right")
    expert = jnp.minimum(expert, group_sizes.shape[0] - 1)
    index = visit - (ends - counts)[expert]
    first = (jnp.cumsum(group_sizes) - group_sizes + low)[expert] + index * size
    return expert, first, ends[-1]


def _tile_loop(body, carry, group_sizes, rows: int, tile: int, min_tile: int):
    """carry after body(size, expert, first row, carry) on every tile of the `rows` padded
    rows, their group sizes multiples of `min_tile`."""
    sizes = _levels(tile, min_tile)
    for level, size in enumerate(sizes):
        expert, first, count = _visits(group_sizes, sizes, level, rows // size)

        def step(v, carry, size=size, expert=expert, first=first):
            return body(size, expert[v], first[v], carry)

        carry = jax.lax.fori_loop(0, count, step, carry)
    return carry


def _rows(array, first, size):
    return jax.lax.dynamic_slice_in_dim(array, first, size)


def _set_rows(array, rows, first):
    return jax.lax.dynamic_update_slice_in_dim(array, rows, first, 0)


def _outer(a, b):
    """a.T @ b in float32: kernel gradients accumulate over many tiles."""
    return jnp.matmul(a.T, b, preferred_element_type=jnp.float32)


def _forward(x, tokens, weights, group_sizes, wi, wo, tile, min_tile):
    """(y [T, D], gate and up projections of the padded rows [P, 2F]) of `_tiled_moe`."""
    rows = tokens.shape[0]
    num_experts, embed, _, hidden = wi.shape
    wi = wi.reshape(num_experts, embed, 2 * hidden)

    def body(size, expert, first, carry):
        y, gate_up = carry
        row_tokens = _rows(tokens, first, size)
        tile_gate_up = x[row_tokens] @ wi[expert]
        hidden_rows = jax.nn.silu(tile_gate_up[:, :hidden]) * tile_gate_up[:, hidden:]
        row_weights = _rows(weights, first, size)[:, None]
        y = y.at[row_tokens].add((hidden_rows @ wo[expert]) * row_weights)
        return y, _set_rows(gate_up, tile_gate_up, first)

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
    tokens, weights, group_sizes = _pad_groups(tokens, weights, group_sizes, min_tile)
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

    def body(size, expert, first, carry):
        dx, d_weights, dwi, dwo = carry
        row_tokens = _rows(tokens, first, size)
        tile_gate_up = _rows(gate_up, first, size)
        gate, up = tile_gate_up[:, :hidden], tile_gate_up[:, hidden:]
        sigmoid = jax.nn.sigmoid(gate)
        silu = gate * sigmoid
        hidden_rows = silu * up
        dy_rows = dy[row_tokens]
        row_weights = _rows(weights, first, size)[:, None]  # zero on gap rows: no gradients
        d_weighted = dy_rows @ wo[expert].T  # d(loss)/d(hidden_rows) before the weights
        # The rows' outputs are hidden_rows @ wo, so their weights' gradients need no recompute.
        d_weights = _set_rows(d_weights, jnp.sum(hidden_rows * d_weighted, axis=1), first)
        d_hidden = d_weighted * row_weights
        d_gate_up = jnp.concatenate(
            [d_hidden * up * sigmoid * (1 + gate * (1 - sigmoid)), d_hidden * silu], axis=1
        )
        dx = dx.at[row_tokens].add(d_gate_up @ wi_flat[expert].T)
        dwi = dwi.at[expert].add(_outer(x[row_tokens], d_gate_up))
        dwo = dwo.at[expert].add(_outer(hidden_rows * row_weights, dy_rows))
        return dx, d_weights, dwi, dwo

    f32 = jnp.float32
    init = (jnp.zeros_like(x), jnp.zeros_like(weights), jnp.zeros_like(wi_flat, f32),
            jnp.zeros_like(wo, f32))
    dx, d_weights, dwi, dwo = _tile_loop(body, init, group_sizes, rows, tile, min_tile)
    return dx, None, d_weights, None, dwi.reshape(wi.shape).astype(wi.dtype), dwo.astype(wo.dtype)


_tiled_moe.defvjp(_tiled_moe_fwd, _tiled_moe_bwd)
