"""Early-fusion image tokens: patches and their embedding."""


def patchify(image, patch_size: int):
    """[H, W, C] -> [(H/p)*(W/p), p*p*C]: row-major patches, each flattened (y, x, c)."""
    h, w, c = image.shape
    p = patch_size
    grid = image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape((h // p) * (w // p), p * p * c)


def unpatchify(patches, *, image_size: int, patch_size: int, channels: int):
    """The inverse of `patchify` for a square image."""
    g, p = image_size // patch_size, patch_size
    grid = patches.reshape(g, g, p, p, channels).transpose(0, 2, 1, 3, 4)
    return grid.reshape(image_size, image_size, channels)
