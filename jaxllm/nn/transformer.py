"""The decoder-only transformer: pre-norm blocks, scanned over layers."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.nn import fp8
from jaxllm.nn.attention import Attention
from jaxllm.nn.linear import Einsum
from jaxllm.nn.masks import Mask
from jaxllm.nn.mla import MLAttention
from jaxllm.nn.mlp import SwiGLU
from jaxllm.nn.moe import MoE
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.positions import RopeScaling
from jaxllm.nn.ssm import Mamba2
from jaxllm.nn.vision import PatchEmbed

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def compute_dtype(config: ModelConfig) -> jnp.dtype:
    return jnp.dtype(config.dtype)


class LayerKind(NamedTuple):
    """What one layer is: MoE or dense feed-forward, its attention pattern (or "ssm": a
    Mamba-2 layer in place of attention) and positions."""

    moe: bool
    attention: str = "global"
    position: str = "rope"


def layer_kinds(config: ModelConfig) -> tuple[LayerKind, ...]:
    """Each layer's kind, from the MoE placement and the attention patterns."""
    return tuple(LayerKind(moe, *config.attention.layer(i))
                 for i, moe in enumerate(config.moe_layers()))


def _period(kinds: tuple[LayerKind, ...]) -> int:
    """The shortest group of layers that repeats exactly over `kinds`."""
    n = len(kinds)
    return next(p for p in range(1, n + 1)
                if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)))


def layer_segments(config: ModelConfig) -> list[tuple[str, tuple[LayerKind, ...], int]]:
    """The stack as scanned segments: (name, the kinds of one layer group, repeats).

    The first dense layers of a DeepSeek-style stack form `dense_layers`, the rest `layers`;
    each is scanned over its shortest repeating group, e.g. 4 layers for Llama 4's three
    chunked RoPE layers and one global NoPE layer.
    """
    kinds = layer_kinds(config)
    first = config.moe.first_dense_layers if config.moe else 0
    segments = []
    for name, part in (("dense_layers", kinds[:first]), ("layers", kinds[first:])):
        if part:
            period = _period(part)
            segments.append((name, part[:period], len(part) // period))
    return segments


def layer_number(config: ModelConfig, path: tuple[str, ...], index: int) -> int:
    """The layer that a variable at `path` under the decoder belongs to, at scan `index`.

    e.g. ("layers_3", "moe") -> 3 unrolled; ("layers", "block_1", "moe") at index 2 with
    groups of 2 after 1 dense layer -> 1 + 2 * 2 + 1 = 6.
    """
    if path[0].startswith("layers_"):
        return int(path[0].removeprefix("layers_"))
    start = 0
    for name, pattern, repeats in layer_segments(config):
        if name == path[0]:
            offset = int(path[1].removeprefix("block_")) if len(pattern) > 1 else 0
            return start + index * len(pattern) + offset
        start += len(pattern) * repeats
    raise KeyError(f"no layer segment {path[0]!r}")


def attention_layer(config: ModelConfig, kind: LayerKind, decode: bool) -> nn.Module:
    """The attention module of a layer of `kind`, or its Mamba-2 layer for kind "ssm"."""
    a = config.attention
    if kind.attention == "ssm":
        return Mamba2(config=a.ssm, dtype=compute_dtype(config), decode=decode,
                      norm_eps=config.norm_eps, name="ssm")
    scaling = None if a.rope_scaling == "none" else RopeScaling(
        kind=a.rope_scaling, factor=a.rope_factor, original_max_len=a.rope_original_len,
        low_freq_factor=a.rope_low_freq_factor, high_freq_factor=a.rope_high_freq_factor)
    common = dict(
        num_heads=config.num_heads, rope_theta=config.rope_theta, dtype=compute_dtype(config),
        decode=decode, context_parallel=config.context_parallel,
        mask=Mask(kind=kind.attention, window=a.window, chunk=a.chunk, stride=a.stride),
        position=kind.position, rope_scaling=scaling, kernel=a.kernel,
        block_size=a.block_size, norm_eps=config.norm_eps, sparse=a.sparse,
        fp8=fp8.recipe(config), lora=config.active_lora, name="attn",
    )
    if a.mla is not None:
        return MLAttention(mla=a.mla, **common)
    return Attention(num_kv_heads=config.num_kv_heads, head_dim=config.resolved_head_dim,
                     qk_norm=a.qk_norm, qkv_bias=a.qkv_bias, **common)


class Block(nn.Module):
    """x + Attention(RMSNorm(x)) (or Mamba2), then h + SwiGLU(RMSNorm(h)), or h + MoE(RMSNorm(h)).

    Returns `(x, None)` so the same module works under `nn.scan`.
    """

    config: ModelConfig
    kind: LayerKind = LayerKind(moe=False)
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg, dtype = self.config, compute_dtype(self.config)
        h = RMSNorm(cfg.norm_eps, dtype, name="attn_norm")(x)
        h = attention_layer(cfg, self.kind, self.decode)(h, positions, segment_ids)
        x = x + h
        h = RMSNorm(cfg.norm_eps, dtype, name="mlp_norm")(x)
        if self.kind.moe:
            h = MoE(cfg.moe, dtype, fp8.recipe(cfg), name="moe")(h)
        else:
            h = SwiGLU(cfg.mlp_dim, dtype, fp8.recipe(cfg), cfg.active_lora, name="mlp")(h)
        x = nn.with_logical_constraint(x + h, ("act_batch", "act_length", "act_embed"))
        return x, None


class LayerGroup(nn.Module):
    """Consecutive blocks `block_0 ...` of the given kinds: the unit a scan repeats when
    layers differ, e.g. dense and MoE layers alternating."""

    config: ModelConfig
    kinds: tuple[LayerKind, ...]
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        for i, kind in enumerate(self.kinds):
            block = Block(self.config, kind, self.decode, name=f"block_{i}")
            x, _ = block(x, positions, segment_ids)
        return x, None


class Decoder(nn.Module):
    """The stack of blocks: `nn.scan` over each segment of `layer_segments`, or a loop.

    Scanned parameters carry a leading `layers` axis; unrolled ones live in
    `layers_0 ... layers_{L-1}`. Both compute the same function. A dense model is one
    segment, `layers`, of single blocks. The "cache" collection of a decoding stack is laid
    out like the parameters. Decoding skips remat: it only saves memory for gradients.
    """

    config: ModelConfig
    decode: bool = False

    def _remat(self, module):
        cfg = self.config
        if cfg.remat == "none" or self.decode:
            return module
        return nn.remat(module, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.config
        if not cfg.scan_layers:
            for i, kind in enumerate(layer_kinds(cfg)):
                block = self._remat(Block)(cfg, kind, self.decode, name=f"layers_{i}")
                x, _ = block(x, positions, segment_ids)
            return x
        for name, kinds, repeats in layer_segments(cfg):
            if len(kinds) == 1:
                unit, args = Block, (cfg, kinds[0], self.decode)
            else:
                unit, args = LayerGroup, (cfg, kinds, self.decode)
            stack = nn.scan(
                self._remat(unit),
                variable_axes={"params": 0, "moe_bias": 0, "moe_metrics": 0,
                               "attention_metrics": 0, "cache": 0, "fp8_meta": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=repeats,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(*args, name=name)(x, positions, segment_ids)
        return x


def embed_lookup(table, tokens):
    """Rows of `table` [vocab, embed] for `tokens`, sharded like the stack's activations.

    The table keeps its FSDP split of the embed dim: each device looks up the tokens of
    all FSDP shards on its embed slice, then the result is resharded by batch. Neither the
    whole table nor its gradient is ever materialised on one device.
    """
    table = nn.with_logical_constraint(table, (None, "embed"))
    tokens = nn.with_logical_constraint(tokens, ("act_batch_replica", "act_length"))
    x = jnp.take(table, tokens, axis=0)
    x = nn.with_logical_constraint(x, ("act_batch_replica", "act_length", "embed"))
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class Transformer(nn.Module):
    """A decoder-only language model: tokens [B, S] -> logits [B, S, vocab].

    `positions` default to 0..S-1 and `segment_ids` to one document per row. With packed
    documents, pass both: attention never crosses a segment boundary and RoPE sees each
    token's position within its own document.

    With `decode=True` the model attends over a KV cache, the mutable "cache" collection
    (see `Attention`), and `positions` place each row's tokens; `jaxllm.infer` drives it.

    With `model.vision.image_size` > 0, `patches` [B, P, patch_size**2 * channels] are the
    images of each row: the k-th `<patch>` token of a row takes the embedding of
    `patches[b, k]` (`jaxllm.nn.vision.PatchEmbed`) in place of its token embedding.
    Without `patches` the model is the text model. With tokens out of their original order
    (context parallelism), pass `patch_index` too (`jaxllm.nn.vision.patch_index` of the
    original order, permuted with the tokens).
    """

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, patches=None,
                 patch_index=None):
        cfg, dtype = self.config, compute_dtype(self.config)
        if self.decode and segment_ids is not None:
            raise ValueError("segment_ids: packed documents cannot be decoded; pass positions")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (cfg.vocab_size, cfg.embed_dim),
        )
        x = embed_lookup(table.astype(dtype), tokens)
        x = self._embed_images(x, tokens, patches, patch_index)
        x = Decoder(cfg, self.decode, name="decoder")(x, positions, segment_ids)
        x = RMSNorm(cfg.norm_eps, dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = jnp.einsum("bse,ve->bsv", x, table.astype(dtype)) * cfg.embed_dim**-0.5
        else:
            logits = Einsum(
                (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), "bse,ev->bsv",
                dtype=dtype, name="head",
            )(x)
        return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))

    def _embed_images(self, x, tokens, patches, patch_index):
        """`x` [B, S, embed] with each `<patch>` token's embedding replaced by its patch's."""
        vision = self.config.vision
        if not vision.image_size:
            if patches is not None:
                raise ValueError("patches: the model is text only; set model.vision.image_size "
                                 "to the images' size to give it images")
            return x
        embed = PatchEmbed(vision, self.config.embed_dim, compute_dtype(self.config),
                           name="patch_embed")
        if patches is None:
            if self.is_initializing():  # the parameters exist whether or not init saw images
                embed(tokens, jnp.zeros((tokens.shape[0], 1, vision.patch_dim)))
            return x
        y, mask = embed(tokens, patches, patch_index)
        return jnp.where(mask[..., None], y, x)
