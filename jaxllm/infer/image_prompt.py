"""A prompt with an image, laid out as the image corpus's documents: the text's `<image>`
marker expanded into the image's span `<image>` + grid² `<patch>` + `</image>`, and the
image's patches for the `<patch>` tokens (`docs/multimodal.md`)."""

from pathlib import Path

import numpy as np

from jaxllm.config import Config, ConfigError
from jaxllm.data.image_readers import read_image
from jaxllm.data.image_sources import IMAGE_END, PATCH
from jaxllm.data.images import IMAGE
from jaxllm.data.tokenizer import Tokenizer, chat_prompt
from jaxllm.nn.vision import pixel_patches


def read_prompt_image(path: str | Path, config: Config) -> np.ndarray:
    """The image file `path` as uint8 [image_size, image_size, 3], resized for the model of
    `config`. A text-only model, or a missing, unreadable or too large file (over
    `data.max_image_pixels`), is a ConfigError that names `--image` and the file."""
    vision = config.model.vision
    if not vision.image_size:
        raise ConfigError(f"--image: the model reads no images (model.vision.image_size=0); "
                          f"{path} cannot be shown to it")
    try:
        return read_image(Path(path), image_size=vision.image_size,
                          max_pixels=config.data.max_image_pixels, where="--image")
    except ConfigError as error:  # named after the data option that reads image files
        raise ConfigError(str(error).removeprefix("data.paths: ")) from None


def image_prompt(tokenizer: Tokenizer, text: str, image: np.ndarray, *, patch_size: int
                 ) -> tuple[list[int], np.ndarray]:
    """(ids, patches): `chat_prompt`'s ids of `text`, its one `<image>` marker (placed first
    when the text has none) expanded into the span of `image` (uint8 [H, W, 3]), and the
    image's patches, float32 [1, grid², patch_dim] in [0, 1] as a batch holds them."""
    patches = pixel_patches(image, patch_size)
    if PATCH in text or IMAGE_END in text:
        raise ConfigError(f"--prompt: holds {IMAGE_END} or {PATCH}; write the image as the "
                          f"marker {IMAGE} alone")
    text = text if IMAGE in text else IMAGE + text
    if text.count(IMAGE) != 1:
        raise ConfigError(f"--prompt: holds {text.count(IMAGE)} {IMAGE} markers for one image")
    special = tokenizer.special
    span = [special[IMAGE], *[special[PATCH]] * len(patches), special[IMAGE_END]]
    ids = [t for i in chat_prompt(tokenizer, text) for t in (span if i == special[IMAGE] else [i])]
    return ids, patches[None]
