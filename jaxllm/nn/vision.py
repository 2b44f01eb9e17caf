"""Early-fusion image tokens: patches and their embedding."""

import flax.linen as nn
import jax.numpy as jnp

from jaxllm.config import VisionConfig
from jaxllm.nn.linear import Einsum


def patchify(image, patch_size: int):
    """[H, W, C] -> [(H/p)*(W/p), p*p*C]: row-major patches, each flattened (y, x, c)."""
    h, w, c = image.shape
    p = patch_size
    grid = image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape((h // p) * (w // p), p * p * c)


def pixel_patches(image, patch_size: int):
    """uint8 pixels [H, W, C] -> float32 `patchify` patches with values in [0, 1], as the
    model reads them."""
    return patchify(image.astype("float32") / 255, patch_size)


def unpatchify(patches, *, image_size: int, patch_size: int, channels: int):
    """The inverse of `patchify` for a square image."""
    g, p = image_size // patch_size, patch_size
    grid = patches.reshape(g, g, p, p, channels).transpose(0, 2, 1, 3, 4)
    return grid.reshape(image_size, image_size, channels)


def patch_index(tokens, patch_token_id: int):
    """Which patch each `<patch>` token takes, [B, S] int32: the k-th `<patch>` token of a
    row (k from 0, left to right) takes `patches[b, k]`; -1 at other tokens. Works on numpy
    arrays (the host data path) and jax arrays alike."""
    is_patch = tokens == patch_token_id
    return is_patch * is_patch.cumsum(axis=-1, dtype="int32") - 1


def patch_layout(tokens, patch_token_id: int, grid: int, index=None):
    """Which patch each `<patch>` token takes and its place in its image: (index, row, col),
    each [B, S] int32 and -1 at other tokens.

    `index` defaults to `patch_index(tokens, patch_token_id)`; pass it when `tokens` are not
    in their original order (context parallelism permutes them). Images are whole and of
    `grid` x `grid` patches, so patch k sits at (row, col) = divmod(k mod grid**2, grid).
    """
    if index is None:
        index = patch_index(tokens, patch_token_id)
    row, col = jnp.divmod(index % (grid * grid), grid)
    return tuple(jnp.where(index >= 0, x, -1) for x in (index, row, col))


def check_patches(patches, tokens, config: VisionConfig) -> None:
    """Raises ValueError unless `patches` is [B, P, patch_dim] for `tokens` [B, S]."""
    batch, width = tokens.shape[0], config.patch_dim
    if patches.ndim != 3 or patches.shape[0] != batch or patches.shape[-1] != width:
        raise ValueError(
            f"patches: expected shape [{batch}, P, {width}] (batch, patches per row, "
            f"model.vision.patch_size**2 * channels), got {tuple(patches.shape)}")


class PatchEmbed(nn.Module):
    """The embedding of each `<patch>` token's patch (Fuyu's linear patch embedding):
    `proj(patch) + row[r] + col[c]`, a linear map of the flattened patch plus learned row
    and column embeddings of its place (r, c) in its image (factorised 2-D positions).

    `__call__(tokens [B, S], patches [B, P, patch_dim], index=None)` returns (embeddings
    [B, S, embed], mask [B, S]): the mask is True at `<patch>` tokens and the embeddings are 0
    elsewhere. `index` is `patch_layout`'s. A `<patch>` token past the P patches of its row
    gets a zero patch.
    """

    config: VisionConfig
    embed_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, patches, index=None):
        cfg = self.config
        check_patches(patches, tokens, cfg)
        index, row, col = patch_layout(tokens, cfg.patch_token_id, cfg.grid, index)
        patches = nn.with_logical_constraint(patches, ("act_batch", None, None))
        proj = Einsum((cfg.patch_dim, self.embed_dim), (None, "embed"), "bpk,ke->bpe",
                      dtype=self.dtype, use_bias=True, name="proj")(patches)  # [B, P, E]
        proj = nn.with_logical_constraint(proj, ("act_batch", None, "act_embed"))
        x = jnp.take_along_axis(proj, jnp.maximum(index, 0)[..., None], axis=1, mode="fill",
                                fill_value=0)  # [B, S, E]
        x = x + self._position("row", row) + self._position("col", col)
        mask = index >= 0
        x = jnp.where(mask[..., None], x, 0)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed")), mask

    def _position(self, name: str, place):
        """The rows of the learned table `name` [grid, embed] at `place` [B, S] (-1: row 0)."""
        table = self.param(name, nn.with_logical_partitioning(
            nn.initializers.normal(stddev=0.02), (None, "embed")),
            (self.config.grid, self.embed_dim))
        return jnp.take(table.astype(self.dtype), jnp.maximum(place, 0), axis=0)
