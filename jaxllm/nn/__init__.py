"""Flax Linen modules. Each is pure: init + apply over a params pytree, no I/O."""

from jaxllm.nn.attention import Attention
from jaxllm.nn.attention_base import AttentionBase
from jaxllm.nn.attention_kernels import attend
from jaxllm.nn.blockwise import blockwise_attention
from jaxllm.nn.gpu_attention import cudnn_attention, pallas_gpu_attention
from jaxllm.nn.kv_cache import cache_positions
from jaxllm.nn.masks import Mask, causal_segment_mask
from jaxllm.nn.mla import MLAttention
from jaxllm.nn.mlp import SwiGLU
from jaxllm.nn.moe import MoE
from jaxllm.nn.naive import dot_product_attention
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.positions import RopeScaling, alibi_slopes, apply_rope
from jaxllm.nn.ring import all_gather_attention, ring_attention
from jaxllm.nn.sparse import Indexer, SparseAttention, sparse_attention
from jaxllm.nn.splash import splash_attention
from jaxllm.nn.ssd import ssd_chunked, ssd_recurrent
from jaxllm.nn.ssm import Mamba2
from jaxllm.nn.transformer import Block, Decoder, Transformer
from jaxllm.nn.vision import (
    PatchEmbed, patch_index, patch_layout, patchify, pixel_patches, unpatchify,
)

__all__ = [
    "Attention",
    "AttentionBase",
    "Block",
    "Decoder",
    "Indexer",
    "MLAttention",
    "Mamba2",
    "Mask",
    "MoE",
    "PatchEmbed",
    "RMSNorm",
    "RopeScaling",
    "SparseAttention",
    "SwiGLU",
    "Transformer",
    "alibi_slopes",
    "all_gather_attention",
    "apply_rope",
    "attend",
    "blockwise_attention",
    "cache_positions",
    "causal_segment_mask",
    "cudnn_attention",
    "dot_product_attention",
    "pallas_gpu_attention",
    "patch_index",
    "patch_layout",
    "patchify",
    "pixel_patches",
    "ring_attention",
    "sparse_attention",
    "splash_attention",
    "ssd_chunked",
    "ssd_recurrent",
    "unpatchify",
]
