"""Self-attention: MHA, GQA and MQA heads; global, sliding, chunked and strided masks, or
DeepSeek sparse attention (`sparse.py`); RoPE, ALiBi or no positions (NoPE); qk-norm and
qkv biases. The kernels are in `attention_kernels.py`, the KV cache in `kv_cache.py`."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.nn.attention_base import AttentionBase
from jaxllm.nn.attention_kernels import attend, self_attention
from jaxllm.nn.kv_cache import write_cache, write_ring_cache
from jaxllm.nn.linear import Einsum
from jaxllm.nn.lora import for_target
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.positions import alibi_slopes, apply_rope, softmax_scale

LORA_TARGETS = {"query": "q", "key": "k", "value": "v"}  # model.lora.targets of each projection


class Attention(AttentionBase, kw_only=True):
    """Self-attention; GQA when num_kv_heads < num_heads.

    Fields as in `AttentionBase`, and:

    Attributes:
      num_kv_heads: key/value heads; must divide num_heads.
      head_dim: width of each head.
      qk_norm: "rms" normalises each query and key head with a learned scale before RoPE
        (Qwen3), with epsilon `norm_eps`; "l2" without one, after RoPE, in RoPE layers only
        (Llama 4).
      qkv_bias: the query, key and value projections add a bias (Qwen2).

    Decoding caches `cached_key`, `cached_value` [B, L, K, D] and the next free slot
    `cache_index` (`write_cache`). `init` sizes L to the input length; each call writes its
    T tokens at the next T slots. Sliding layers keep a ring of `window` slots instead
    (`write_ring_cache`).
    """

    num_kv_heads: int
    head_dim: int
    qk_norm: str = "none"
    qkv_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x [B, S, E], positions and segment_ids [B, S] -> [B, S, E].

        When decoding, `segment_ids` is unused: `positions` place each row in the cache.
        """

        def project(heads: int, head_axis: str, name: str) -> jax.Array:
            out = Einsum(
                (x.shape[-1], heads, self.head_dim), ("embed", head_axis, "head_dim"),
                "bse,ehd->bshd", dtype=self.dtype, use_bias=self.qkv_bias, fp8=self.fp8,
                lora=for_target(self.lora, LORA_TARGETS[name]), name=name,
            )(x)
            return nn.with_logical_constraint(
                out, ("act_batch", "act_length", f"act_{head_axis}", None)
            )

        q = self._position(project(self.num_heads, "heads", "query"), positions, "query")
        k = self._position(project(self.num_kv_heads, "kv_heads", "key"), positions, "key")
        v = project(self.num_kv_heads, "kv_heads", "value")
        slopes = alibi_slopes(self.num_heads) if self.position == "alibi" else None
        scale = softmax_scale(self.head_dim, self.rope_scaling) if self.rope_scaling else None
        if self.mask.kind == "sparse":
            if slopes is not None:
                raise ValueError("sparse attention layers take RoPE or no positions, not ALiBi")
            if self.decode:
                cache, _, _ = write_cache(self, positions, key=k, value=v)
                k, v = cache["key"], cache["value"]
            out = self._sparse_attention(x, q, k, v, positions, segment_ids, scale)
        elif self.decode:
            if self.mask.kind == "sliding":
                cache, k_pos, k_seg = write_ring_cache(self, positions, self.mask.window,
                                                       key=k, value=v)
            else:
                cache, k_pos, k_seg = write_cache(self, positions, key=k, value=v)
            out = attend(q, cache["key"], cache["value"], q_idx=positions,
                         q_seg=jnp.ones_like(positions), k_idx=k_pos, k_seg=k_seg,
                         mask=self.mask, slopes=slopes, scale=scale)
        else:
            out = self_attention(q, k, v, positions, segment_ids, mask=self.mask, slopes=slopes,
                                 scale=scale, kernel=self.kernel, block_size=self.block_size,
                                 context_parallel=self.context_parallel)
        out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", None))
        return Einsum(
            (self.num_heads, self.head_dim, x.shape[-1]), ("heads", "head_dim", "embed"),
            "bshd,hde->bse", fan_in=(0, 1), dtype=self.dtype, fp8=self.fp8,
            lora=for_target(self.lora, "o"), name="out",
        )(out)

    def _position(self, x: jax.Array, positions: jax.Array, name: str) -> jax.Array:
        """The query or key heads with qk-norm and RoPE, as this layer uses them."""
        if self.qk_norm == "rms":
            x = RMSNorm(self.norm_eps, self.dtype, name=f"{name}_norm")(x)
        if self.position != "rope":
            return x
        x = apply_rope(x, positions, self.rope_theta, self.rope_scaling)
        if self.qk_norm == "l2":
            x32 = x.astype(jnp.float32)
            scale = jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.norm_eps)
            x = (x32 * scale).astype(x.dtype)
        return x
