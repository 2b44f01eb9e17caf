"""The Mamba-2 layer (Dao & Gu 2024, arXiv 2405.21060): a sequence-mixing layer that is not
attention, for hybrid stacks (`docs/hybrid.md`). Its scan is `ssd.py`."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import SSMConfig
from jaxllm.nn.linear import Einsum
from jaxllm.nn.mesh_axes import context_shards
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.ssd import document_index, ssd_chunked, ssd_step

HEADS = ("act_batch", "act_length", "act_heads", None)
STATE = ("act_batch", "act_length", None)


class CausalConv(nn.Module):
    """A causal depthwise conv over the length of u [B, T, *channels] with `width` taps and
    a bias, that does not reach across documents (`doc` [B, T], `ssd.document_index`).

    Decoding keeps the last width - 1 inputs in the "cache" collection, `history`
    [B, width - 1, *channels]; they belong to document 0 of the next call, and inputs of an
    earlier document than the last token's are stored as zeros.

    Attributes:
      width: taps; tap width - 1 is the current token.
      axes: a logical axis name per channel axis, for the kernel [width, *channels].
      decode: read and write the history.
    """

    width: int
    axes: tuple[str | None, ...]
    decode: bool = False

    @nn.compact
    def __call__(self, u: jax.Array, doc: jax.Array) -> jax.Array:
        batch, length, *channels = u.shape
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                                out_axis=tuple(range(1, len(channels) + 1)))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, (None, *self.axes)),
                            (self.width, *channels))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes),
                          tuple(channels))
        history = jnp.zeros((batch, self.width - 1, *channels), u.dtype)
        if self.decode:
            cached = self.variable("cache", "history", jnp.zeros, history.shape, u.dtype)
            history = cached.value
        full = jnp.concatenate([history, u], axis=1)
        full_doc = jnp.concatenate([jnp.zeros((batch, self.width - 1), doc.dtype), doc], axis=1)
        extra = (1,) * len(channels)
        out = bias.astype(u.dtype)
        for tap in range(self.width):
            same = (full_doc[:, tap:tap + length] == doc).reshape(batch, length, *extra)
            out = out + jnp.where(same, full[:, tap:tap + length], 0) * kernel[tap].astype(u.dtype)
        if self.decode:
            keep = (full_doc[:, length:] == doc[:, -1:]).reshape(batch, self.width - 1, *extra)
            cached.value = jnp.where(keep, full[:, length:], 0).astype(u.dtype)
        return out


def _dt_bias_init(dt_min: float, dt_max: float):
    """softplus^-1 of step sizes drawn log-uniform in [dt_min, dt_max] (Mamba-2's init)."""

    def init(key, shape, dtype=jnp.float32):
        log_dt = jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
        dt = jnp.exp(log_dt)
        return dt + jnp.log(-jnp.expm1(-dt))

    return init


def _a_log_init(key, shape, dtype=jnp.float32):
    """log(-A) with -A uniform in [1, 16] (Mamba-2's init)."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


class Mamba2(nn.Module, kw_only=True):
    """x [B, S, E] -> [B, S, E]: the Mamba-2 block's mixer.

    Projections of x give a gate z and the inputs x [H, P], the shared B and C [N] and a
    step size per head; x, B and C pass a causal conv and SiLU; the SSD scan (`ssd.py`)
    with a learned decay A = -exp(a_log) per head, plus a skip `d_skip` x, is gated by
    SiLU(z), RMS-normed over all heads and projected back to E.

    Attributes:
      config: heads, widths, conv taps and chunk size (`SSMConfig`).
      dtype: compute dtype of the projections and conv; the scan runs in float32.
      decode: the recurrent form over the "cache" collection: `ssm_state` [B, H, P, N]
        (float32) and each conv's `history`, which replace this layer's KV cache. A call of
        one token steps the recurrence (`ssd_step`); a longer one (a prefill) runs the
        chunked form from the cached state.
      norm_eps: epsilon of the gated RMSNorm.
    """

    config: SSMConfig
    dtype: jnp.dtype = jnp.float32
    decode: bool = False
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """positions and segment_ids [B, S]: the state restarts at each document start."""
        if context_shards() > 1:
            raise ValueError("SSM layers do not run with a mesh context axis > 1")
        s = self.config
        heads, width, embed = s.num_heads, s.head_dim, x.shape[-1]

        def project(shape, axes, equation, name):
            return Einsum((embed, *shape), ("embed", *axes), equation, dtype=self.dtype,
                          name=name)(x)

        z = nn.with_logical_constraint(
            project((heads, width), ("heads", "head_dim"), "bse,ehp->bshp", "gate"), HEADS)
        u = nn.with_logical_constraint(
            project((heads, width), ("heads", "head_dim"), "bse,ehp->bshp", "input"), HEADS)
        b = project((s.state_dim,), (None,), "bse,en->bsn", "input_state")
        c = project((s.state_dim,), (None,), "bse,en->bsn", "output_state")
        dt = project((heads,), ("heads",), "bse,eh->bsh", "step")
        doc = document_index(positions, segment_ids)
        u = nn.silu(CausalConv(s.conv_width, ("heads", "head_dim"), self.decode,
                               name="conv_input")(u, doc))
        b, c = (nn.with_logical_constraint(nn.silu(CausalConv(
            s.conv_width, (None,), self.decode, name=f"conv_{name}")(v, doc)), STATE)
            for v, name in ((b, "input_state"), (c, "output_state")))
        y = self._scan(u, dt, b, c, doc)
        y = nn.with_logical_constraint(y.astype(self.dtype) * nn.silu(z), HEADS)
        y = RMSNorm(self.norm_eps, self.dtype, name="norm")(y.reshape(*y.shape[:2], -1))
        y = nn.with_logical_constraint(y.reshape(*y.shape[:2], heads, width), HEADS)
        return Einsum((heads, width, embed), ("heads", "head_dim", "embed"), "bshp,hpe->bse",
                      fan_in=(0, 1), dtype=self.dtype, name="out")(y)

    def _scan(self, u, dt, b, c, doc):
        """The SSD scan plus the skip, in float32: y [B, S, H, P]."""
        s = self.config
        a_log = self.param("a_log", nn.with_logical_partitioning(_a_log_init, ("heads",)),
                           (s.num_heads,))
        dt_bias = self.param("dt_bias", nn.with_logical_partitioning(
            _dt_bias_init(s.dt_min, s.dt_max), ("heads",)), (s.num_heads,))
        d_skip = self.param("d_skip", nn.with_logical_partitioning(nn.initializers.ones,
                                                                   ("heads",)), (s.num_heads,))
        u, b, c = (v.astype(jnp.float32) for v in (u, b, c))
        dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias)
        a = -jnp.exp(a_log)
        state_axes = ("act_batch", "act_heads", None, None)
        if not self.decode:
            y, _ = ssd_chunked(u, dt, a, b, c, doc, chunk=s.chunk)
        else:
            shape = (u.shape[0], s.num_heads, s.head_dim, s.state_dim)
            cached = self.variable("cache", "ssm_state", jnp.zeros, shape, jnp.float32)
            if u.shape[1] == 1:
                y, state = ssd_step(u[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], cached.value,
                                    doc[:, 0] > 0)
                y = y[:, None]
            else:
                y, state = ssd_chunked(u, dt, a, b, c, doc, chunk=s.chunk, state=cached.value)
            cached.value = nn.with_logical_constraint(state, state_axes)
        return y + d_skip[:, None] * u
