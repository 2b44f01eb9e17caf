"""State space duality (SSD, Mamba-2: Dao & Gu 2024, arXiv 2405.21060): the scan of a
selective state-space model whose decay is a scalar per head, in two forms that agree.

For each head h, with step size dt_t, decay a_t = exp(dt_t A_h) (A_h < 0), input x_t [P],
input projection B_t [N] and output projection C_t [N]:

    H_t = a_t H_{t-1} + dt_t x_t B_t^T        (H_t [P, N])
    y_t = H_t C_t

`ssd_recurrent` runs it token by token (`ssd_step`, the decoding form); `ssd_chunked` cuts
the sequence into chunks, computes the work inside each chunk as masked matmuls and passes
the state from chunk to chunk. Both reset the state where a new document starts: `doc`
[B, T] counts the document starts up to each token (`document_index`), and a token sees
only the inputs, and the incoming `state`, of its own document (the state passed in
belongs to document 0).
"""

import jax
import jax.numpy as jnp


def document_index(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, T] int32: the number of document starts at or before each token, where a token
    starts a document if its position is 0 or its segment id differs from the previous
    token's. Tokens of index 0 (no start at or before them) continue the state passed
    in."""
    previous = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    starts = (positions == 0) | (segment_ids != previous)
    return jnp.cumsum(starts, axis=1, dtype=jnp.int32)


def _decay(log_decay: jax.Array, allowed: jax.Array) -> jax.Array:
    """exp(log_decay) where `allowed`, else 0, with zero gradients through masked entries."""
    return jnp.exp(jnp.where(allowed, log_decay, -jnp.inf))


def ssd_step(x, dt, a, b, c, state, reset):
    """One token of the recurrence.

    x [B, H, P], dt [B, H], a [H], b and c [B, N], state [B, H, P, N], reset [B] bool (the
    token starts a document: the state before it is dropped). Returns (y [B, H, P], state).
    """
    decay = jnp.where(reset[:, None], 0.0, jnp.exp(dt * a))
    state = decay[..., None, None] * state + jnp.einsum("bhp,bn->bhpn", x * dt[..., None], b)
    return jnp.einsum("bhpn,bn->bhp", state, c), state


def ssd_recurrent(x, dt, a, b, c, doc, state=None):
    """The recurrence over a sequence, one token at a time: the reference form.

    x [B, T, H, P], dt [B, T, H], a [H], b and c [B, T, N], doc [B, T], state [B, H, P, N]
    or None (zeros). Returns (y [B, T, H, P], the state after the last token).
    """
    if state is None:
        state = jnp.zeros((x.shape[0], *x.shape[2:], b.shape[-1]), jnp.float32)
    resets = doc != jnp.concatenate([jnp.zeros_like(doc[:, :1]), doc[:, :-1]], axis=1)

    def step(state, inputs):
        x_t, dt_t, b_t, c_t, reset_t = inputs
        y_t, state = ssd_step(x_t, dt_t, a, b_t, c_t, state, reset_t)
        return state, y_t

    inputs = tuple(jnp.moveaxis(v, 1, 0) for v in (x, dt, b, c, resets))
    state, y = jax.lax.scan(step, state, inputs)
    return jnp.moveaxis(y, 0, 1), state


def _chunks(value: jax.Array, chunk: int, pad_mode: str = "constant") -> jax.Array:
    """[B, T, ...] -> [B, T' / chunk, chunk, ...], padded at the end to T' a multiple of
    `chunk`."""
    pad = -value.shape[1] % chunk
    widths = ((0, 0), (0, pad)) + ((0, 0),) * (value.ndim - 2)
    value = jnp.pad(value, widths, mode=pad_mode)
    return value.reshape(value.shape[0], -1, chunk, *value.shape[2:])


def ssd_chunked(x, dt, a, b, c, doc, *, chunk: int, state=None):
    """The chunked form: `ssd_recurrent`'s result, with the work inside each chunk of `chunk`
    tokens done as masked matmuls and the state passed between chunks.

    With cs_i the cumulative sum of dt A within a chunk, token i of a chunk gets

        y_i = sum_{j <= i, same doc} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j      (intra-chunk)
            + exp(cs_i) H_in C_i   (if i is in the document of the incoming state H_in)

    and the state leaving the chunk is exp(cs_last) H_in (if no document starts in it) plus
    sum_j exp(cs_last - cs_j) dt_j x_j B_j^T over the last token's document. A length that
    `chunk` does not divide is padded with dt = 0 tokens, which leave the state unchanged.
    Arguments and result as in `ssd_recurrent`.
    """
    batch, length, heads, width = x.shape
    if state is None:
        state = jnp.zeros((batch, heads, width, b.shape[-1]), jnp.float32)
    x, dt, b, c = (_chunks(v, chunk) for v in (x, dt, b, c))  # [B, C, Q, ...]
    doc = _chunks(doc, chunk, pad_mode="edge")  # [B, C, Q]
    cs = jnp.cumsum(dt * a, axis=2)  # [B, C, Q, H]
    xdt = x * dt[..., None]
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    within = (doc[..., :, None] == doc[..., None, :]) & causal  # [B, C, Qi, Qj]
    decay = _decay(cs[:, :, :, None] - cs[:, :, None], within[..., None])  # [B, C, Qi, Qj, H]
    scores = jnp.einsum("bcin,bcjn->bcij", c, b)
    y = jnp.einsum("bcij,bcijh,bcjhp->bcihp", scores, decay, xdt)

    last_doc = doc[:, :, -1]  # [B, C]
    to_end = _decay(cs[:, :, -1:] - cs, (doc == last_doc[..., None])[..., None])  # [B, C, Q, H]
    local = jnp.einsum("bcjh,bcjhp,bcjn->bchpn", to_end, xdt, b)  # each chunk's own state
    enter_doc = jnp.concatenate([jnp.zeros_like(last_doc[:, :1]), last_doc[:, :-1]], axis=1)
    carry = _decay(cs[:, :, -1], (last_doc == enter_doc)[..., None])  # [B, C, H]

    def pass_state(h, inputs):
        carry_c, local_c = inputs
        return carry_c[..., None, None] * h + local_c, h

    state, entering = jax.lax.scan(
        pass_state, state, (jnp.moveaxis(carry, 1, 0), jnp.moveaxis(local, 1, 0)))
    from_start = _decay(cs, (doc == enter_doc[..., None])[..., None])  # [B, C, Q, H]
    y = y + jnp.einsum("bcin,cbhpn,bcih->bcihp", c, entering, from_start)
    return y.reshape(batch, -1, heads, width)[:, :length], state
