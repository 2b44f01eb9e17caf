"""Multi-head Latent Attention (DeepSeek-V2/V3): keys and values expand from one normed
latent per token, and a single rotary key is shared by all heads, so the KV cache holds
only kv_lora_rank + qk_rope_head_dim values per token (`docs/references.md`,
"Multi-head Latent Attention")."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import MLAConfig
from jaxllm.nn.attention_base import AttentionBase
from jaxllm.nn.attention_kernels import EQUAL_WIDTH_KERNELS, attend, self_attention
from jaxllm.nn.kv_cache import write_cache
from jaxllm.nn.linear import Einsum
from jaxllm.nn.mesh_axes import context_shards
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.positions import apply_rope, softmax_scale

HEADS = ("act_batch", "act_length", "act_heads", None)


class MLAttention(AttentionBase, kw_only=True):
    """Self-attention with keys and values from a low-rank latent.

    Fields as in `AttentionBase`, with num_heads query, key and value heads, positions "rope"
    or "none" (NoPE: the rope parts of queries and keys stay unrotated), and norm_eps for the
    query and latent RMSNorms; and:

    Attributes:
      mla: the latent ranks and head widths; `mla.absorb` picks the decoding path.

    Decoding caches the normed latent `cached_latent` [B, L, kv_lora_rank] and the rotated
    shared key `cached_rope_key` [B, L, qk_rope_head_dim] (`write_cache`). absorb=True folds
    the key up-projection into the queries and attends as MQA over the latent, then applies
    the value up-projection to the output; absorb=False expands the whole cache into
    per-head keys and values every step. Both agree. Sparse layers (mask "sparse") decode
    by expanding the cache (the absorbed path attends to every key).
    """

    mla: MLAConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x [B, S, E], positions and segment_ids [B, S] -> [B, S, E].

        When decoding, `segment_ids` is unused: `positions` place each row in the cache.
        """
        if self.position not in ("rope", "none"):
            raise ValueError(f"MLA layers take rope or none positions, not {self.position!r}")
        m, embed = self.mla, x.shape[-1]
        nope, rope, rank = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
        q_nope, q_rope = jnp.split(self._query(x), [nope], axis=-1)
        q_rope = self._rope(q_rope, positions)
        down = Einsum((embed, rank + rope), ("embed", "kv_lora"), "bse,ec->bsc",
                      dtype=self.dtype, fp8=self.fp8, name="kv_down")(x)
        latent = RMSNorm(self.norm_eps, self.dtype, name="kv_norm")(down[..., :rank])
        rope_key = self._rope(down[..., None, rank:], positions)[:, :, 0]
        scale = softmax_scale(nope + rope, self.rope_scaling)
        if self.decode:
            cache, k_pos, k_seg = write_cache(self, positions, latent=latent, rope_key=rope_key)
            latent, rope_key = cache["latent"], cache["rope_key"]
            q_seg = jnp.ones_like(positions)
        sparse = self.mask.kind == "sparse"
        if self.decode and m.absorb and not sparse:
            q = jnp.concatenate([self._up("key_up", nope, "bthd,chd->bthc")(q_nope), q_rope], -1)
            k = jnp.concatenate([latent, rope_key], -1)[:, :, None]
            out = attend(q, k, latent[:, :, None], q_idx=positions, q_seg=q_seg, k_idx=k_pos,
                         k_seg=k_seg, mask=self.mask, scale=scale)  # [B, T, H, kv_lora_rank]
            out = self._up("value_up", m.v_head_dim, "bthc,chd->bthd")(out)
        else:
            q = nn.with_logical_constraint(jnp.concatenate([q_nope, q_rope], -1), HEADS)
            k_nope = self._up("key_up", nope, "bsc,chd->bshd")(latent)
            k = jnp.concatenate(
                [k_nope, jnp.broadcast_to(rope_key[:, :, None], (*k_nope.shape[:3], rope))], -1)
            v = self._up("value_up", m.v_head_dim, "bsc,chd->bshd")(latent)
            if sparse:
                out = self._sparse_attention(x, q, k, v, positions, segment_ids, scale)
            elif self.decode:
                out = attend(q, k, v, q_idx=positions, q_seg=q_seg, k_idx=k_pos, k_seg=k_seg,
                             mask=self.mask, scale=scale)
            else:
                out = self._self_attention(q, k, v, positions, segment_ids, scale)
        out = nn.with_logical_constraint(out, HEADS)
        return Einsum((self.num_heads, m.v_head_dim, embed), ("heads", "head_dim", "embed"),
                      "bshd,hde->bse", fan_in=(0, 1), dtype=self.dtype, fp8=self.fp8,
                      name="out")(out)

    def _query(self, x: jax.Array) -> jax.Array:
        """[B, T, H, qk_nope_head_dim + qk_rope_head_dim] queries, through the q latent when
        `q_lora_rank` is set."""
        m, heads = self.mla, self.num_heads
        width = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            return Einsum((x.shape[-1], heads, width), ("embed", "heads", "head_dim"),
                          "bse,ehd->bshd", dtype=self.dtype, fp8=self.fp8, name="query")(x)
        c = Einsum((x.shape[-1], m.q_lora_rank), ("embed", "q_lora"), "bse,ec->bsc",
                   dtype=self.dtype, fp8=self.fp8, name="query_down")(x)
        c = RMSNorm(self.norm_eps, self.dtype, name="query_norm")(c)
        return Einsum((m.q_lora_rank, heads, width), ("q_lora", "heads", "head_dim"),
                      "bsc,chd->bshd", dtype=self.dtype, fp8=self.fp8, name="query_up")(c)

    def _up(self, name: str, width: int, equation: str) -> Einsum:
        """The up-projection `name` [kv_lora_rank, H, width] out of the latent, or, with
        another `equation`, its transpose (absorbed decoding): one kernel either way."""
        return Einsum((self.mla.kv_lora_rank, self.num_heads, width),
                      ("kv_lora", "heads", "head_dim"), equation, dtype=self.dtype, fp8=self.fp8,
                      name=name)

    def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        if self.position == "none":
            return x
        return apply_rope(x, positions, self.rope_theta, self.rope_scaling)

    def _self_attention(self, q, k, v, positions, segment_ids, scale):
        """`self_attention`; the ring and EQUAL_WIDTH_KERNELS need v as wide as k, so there v
        is zero-padded and the output sliced, which is exact."""
        width = v.shape[-1]
        if context_shards() > 1 or self.kernel in EQUAL_WIDTH_KERNELS:
            v = jnp.pad(v, ((0, 0),) * 3 + ((0, k.shape[-1] - width),))
        out = self_attention(q, k, v, positions, segment_ids, mask=self.mask, scale=scale,
                             kernel=self.kernel, block_size=self.block_size,
                             context_parallel=self.context_parallel)
        return out[..., :width]
