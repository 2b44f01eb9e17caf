"""Flax Linen modules. Each is pure: init + apply over a params pytree, no I/O."""

from jaxllm.nn.attention import Attention, cache_mask, causal_segment_mask, dot_product_attention
from jaxllm.nn.mlp import SwiGLU
from jaxllm.nn.moe import MoE
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.positions import apply_rope
from jaxllm.nn.ring import all_gather_attention, ring_attention
from jaxllm.nn.transformer import Block, Decoder, Transformer

__all__ = [
    "Attention",
    "Block",
    "Decoder",
    "MoE",
    "RMSNorm",
    "SwiGLU",
    "Transformer",
    "all_gather_attention",
    "apply_rope",
    "cache_mask",
    "causal_segment_mask",
    "dot_product_attention",
    "ring_attention",
]
