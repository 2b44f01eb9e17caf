"""The decoder-only transformer: pre-norm blocks, scanned over layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.nn.attention import Attention
from jaxllm.nn.linear import Einsum
from jaxllm.nn.mlp import SwiGLU
from jaxllm.nn.norms import RMSNorm

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def compute_dtype(config: ModelConfig) -> jnp.dtype:
    return jnp.dtype(config.dtype)


class Block(nn.Module):
    """x + Attention(RMSNorm(x)), then h + SwiGLU(RMSNorm(h)).

    Returns `(x, None)` so the same module works under `nn.scan`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg, dtype = self.config, compute_dtype(self.config)
        h = RMSNorm(cfg.norm_eps, dtype, name="attn_norm")(x)
        h = Attention(
            cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.rope_theta, dtype,
            name="attn",
        )(h, positions, segment_ids)
        x = x + h
        h = SwiGLU(cfg.mlp_dim, dtype, name="mlp")(RMSNorm(cfg.norm_eps, dtype, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x + h, ("act_batch", "act_length", "act_embed"))
        return x, None


class Decoder(nn.Module):
    """The stack of blocks: one `nn.scan` over layers, or an unrolled loop.

    Scanned parameters carry a leading `layers` axis; unrolled ones live in
    `layers_0 ... layers_{L-1}`. Both compute the same function.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.config
        block = Block
        if cfg.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(cfg, name="layers")(x, positions, segment_ids)
        else:
            for i in range(cfg.num_layers):
                x, _ = block(cfg, name=f"layers_{i}")(x, positions, segment_ids)
        return x


class Transformer(nn.Module):
    """A decoder-only language model: tokens [B, S] -> logits [B, S, vocab].

    `positions` default to 0..S-1 and `segment_ids` to one document per row. With packed
    documents, pass both: attention never crosses a segment boundary and RoPE sees each
    token's position within its own document.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        cfg, dtype = self.config, compute_dtype(self.config)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (cfg.vocab_size, cfg.embed_dim),
        )
        # FSDP: gather the whole table for the lookup, then shard the result by batch.
        full_table = nn.with_logical_constraint(table, (None, None)).astype(dtype)
        x = jnp.take(full_table, tokens, axis=0)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        x = Decoder(cfg, name="decoder")(x, positions, segment_ids)
        x = RMSNorm(cfg.norm_eps, dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = jnp.einsum("bse,ve->bsv", x, table.astype(dtype)) * cfg.embed_dim**-0.5
        else:
            logits = Einsum(
                (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), "bse,ev->bsv",
                dtype=dtype, name="head",
            )(x)
        return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
