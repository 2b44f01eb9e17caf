"""What every self-attention layer shares (`Attention`, `MLAttention`): its fields, and the
DeepSeek sparse attention it runs in a layer of mask "sparse"."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import LoRAConfig, SparseConfig
from jaxllm.nn.fp8 import Recipe
from jaxllm.nn.masks import Mask
from jaxllm.nn.positions import RopeScaling
from jaxllm.nn.sparse import SparseAttention


class AttentionBase(nn.Module, kw_only=True):
    """The fields of a self-attention layer; subclasses add their projections.

    Attributes:
      num_heads: query heads.
      rope_theta: RoPE base.
      dtype: compute dtype; parameters are float32.
      decode: attend over a KV cache, the "cache" collection (`kv_cache`); each subclass
        says what it caches.
      context_parallel: with a mesh `context` axis > 1, "ring" passes K/V around the ring;
        "all_gather" gathers every K/V block (the simple baseline).
      mask: which earlier keys a query sees (global, sliding, chunked, strided), or "sparse":
        DeepSeek sparse attention under a global causal mask, configured by `sparse`.
      position: "rope", "alibi" (a per-head linear score bias) or "none" (NoPE).
      rope_scaling: linear, YaRN or llama3 RoPE scaling; YaRN also scales the softmax.
      kernel, block_size: see `attention_kernels.attend`.
      norm_eps: epsilon of the layer's RMSNorms.
      sparse: DeepSeek sparse attention (`SparseAttention`) for a mask of kind "sparse".
      fp8: the fp8 recipe of the projections (`Einsum`); attention itself and the sparse
        indexer stay in the compute dtype.
      lora: low-rank adapters on the projections its targets q, k, v, o name (`Attention`).
    """

    num_heads: int
    rope_theta: float = 10_000.0
    dtype: jnp.dtype = jnp.float32
    decode: bool = False
    context_parallel: str = "ring"
    mask: Mask = Mask()
    position: str = "rope"
    rope_scaling: RopeScaling | None = None
    kernel: str = "auto"
    block_size: int = 128
    norm_eps: float = 1e-6
    sparse: SparseConfig | None = None
    fp8: Recipe | None = None
    lora: LoRAConfig | None = None

    def _sparse_attention(self, x, q, k, v, positions, segment_ids, scale) -> jax.Array:
        """`SparseAttention` of queries q to keys k and values v (the whole cache when
        decoding), in this layer's scope: its indexer is this layer's `indexer`."""
        dsa = SparseAttention(config=self.sparse, dtype=self.dtype, decode=self.decode)
        nn.share_scope(self, dsa)
        return dsa(x, q, k, v, positions=positions, segment_ids=segment_ids, scale=scale)
