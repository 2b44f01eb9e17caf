"""Batches of documents with images, optionally mixed with text-only documents.

A document's text holds the marker `<image>` where each of its images goes; the source
expands each marker into the image's span of tokens

    <image> <patch> x (image_size // patch_size)**2 </image>

and each batch carries, beside the keys of `jaxllm.data.sources`, `patches`: float32
[rows, max_patches, patch_size**2 * 3], the k-th `<patch>` token of a row (counted over the
whole packed row) taking patch k, in the order of `jaxllm.nn.vision.patchify`. Packing never
splits an image span: a document with images must fit in a row, and one that would overflow a
row's tokens or patches starts the next row. `<patch>` tokens are never targets.
"""

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from jaxllm.data.images import IMAGE
from jaxllm.data.sources import encode_document, packed_batches, prompt_length
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.nn.vision import patchify

IMAGE_END, PATCH = "</image>", "<patch>"
CHANNELS = 3


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDocument:
    """A text with one `<image>` marker per image (uint8 [size, size, 3] each), and the name
    errors call it by (a file and line, a dataset example)."""

    text: str
    images: tuple[np.ndarray, ...]
    name: str


def default_row_patches(seq_len: int, patches_per_image: int) -> int:
    """The patches of a row of `seq_len` tokens by default: an image's for every image span
    (`<image>`, its patches, `</image>`) that fits in the row."""
    return seq_len // (patches_per_image + 2) * patches_per_image


class ImageTextSource:
    """Documents with images (this process's shard), and text-only documents mixed in,
    reshuffled each epoch and packed into rows with their patches (`packed_batches`).

    `text_share` in [0, 1) makes the text documents that share of all documents, cycling
    through `texts` (or a prefix of them); None takes each of `texts` once. `max_patches` is
    the patches a row holds, a multiple of the patches of an image; None: as many images as
    a row of `seq_len` tokens could hold.
    """

    def __init__(
        self, documents: Sequence[ImageDocument], tokenizer: Tokenizer, *, image_size: int,
        patch_size: int, seed: int = 0, texts: Sequence[str] = (),
        text_share: float | None = None, max_patches: int | None = None,
    ):
        if not documents:
            raise ValueError("an ImageTextSource needs at least one document with an image")
        if image_size % patch_size:
            raise ValueError(f"image_size: {image_size} is not a multiple of patch_size "
                             f"{patch_size}")
        if missing := missing_tokens(tokenizer):
            raise ValueError(f"the tokenizer {missing}")
        self.tokenizer, self.seed = tokenizer, seed
        self.image_size, self.patch_size = image_size, patch_size
        self.patches_per_image = (image_size // patch_size) ** 2
        self.patch_dim = patch_size**2 * CHANNELS
        self.max_patches = max_patches
        self._names = [doc.name for doc in documents]
        encoded = [self._encode(doc) for doc in documents]
        self._docs = [ids for ids, _ in encoded]
        self._patches = [patches for _, patches in encoded]
        span_ids = {tokenizer.special[token] for token in (IMAGE, PATCH, IMAGE_END)}
        for text in _mixed_texts(texts, text_share, len(documents)):
            name = f"text document {len(self._docs) - len(documents)}"
            ids = encode_document(tokenizer, text)
            if span_ids & set(ids):  # a <patch> of no image would shift the row's patches
                raise ValueError(f"{name}: the text holds {IMAGE}, {IMAGE_END} or {PATCH}, "
                                 "which only an image document may")
            self._docs.append(np.asarray(ids, np.int32))
            self._patches.append(np.zeros((0, self.patch_dim), np.uint8))
            self._names.append(name)

    def __len__(self) -> int:
        return len(self._docs)

    def span(self) -> list[int]:
        """The token ids of one image span."""
        special = self.tokenizer.special
        return [special[IMAGE], *[special[PATCH]] * self.patches_per_image, special[IMAGE_END]]

    def batches(
        self, batch_size: int, seq_len: int, start: int = 0, mask_prompt: bool = False
    ) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of batches `start`, `start + 1`, ..., endlessly;
        `mask_prompt` trains only past `<think>`, as in `sources.DocumentSource`."""
        max_patches = self.row_patches(seq_len)
        for name, doc, patches in zip(self._names, self._docs, self._patches):
            if len(patches) and len(doc) > seq_len:
                raise ValueError(f"{name}: {len(doc)} tokens with its image span do not fit "
                                 f"in a row of seq_len={seq_len}")
            if len(patches) > max_patches:
                raise ValueError(f"{name}: {len(patches)} patches do not fit in a row of "
                                 f"max_patches={max_patches}")
        patch_id = self.tokenizer.special[PATCH]
        masks = [(np.arange(len(doc)) >= (prompt_length(self.tokenizer, doc) if mask_prompt
                                          else 0)) & (doc != patch_id) for doc in self._docs]
        return packed_batches(self._docs, masks, pad_id=self.tokenizer.pad_id, seed=self.seed,
                              batch_size=batch_size, seq_len=seq_len, start=start,
                              patches=self._patches, max_patches=max_patches)

    def row_patches(self, seq_len: int) -> int:
        """The patches each row of `seq_len` tokens carries: `max_patches`, or by default
        one image's for every image span that fits in the row."""
        per_image = self.patches_per_image
        if self.max_patches is None:
            return default_row_patches(seq_len, per_image)
        if self.max_patches % per_image:
            raise ValueError(f"max_patches: {self.max_patches} is not a multiple of the "
                             f"{per_image} patches of an image")
        return self.max_patches

    def _encode(self, doc: ImageDocument) -> tuple[np.ndarray, np.ndarray]:
        """The document's ids with each marker expanded, and its patches (uint8 [k, d])."""
        special = self.tokenizer.special
        ids = encode_document(self.tokenizer, doc.text)
        if special[IMAGE_END] in ids or special[PATCH] in ids:
            raise ValueError(f"{doc.name}: the text holds {IMAGE_END} or {PATCH}; write each "
                             f"image as the marker {IMAGE} alone")
        if ids.count(special[IMAGE]) != len(doc.images):
            raise ValueError(f"{doc.name}: {ids.count(special[IMAGE])} {IMAGE} markers for "
                             f"{len(doc.images)} images")
        shape = (self.image_size, self.image_size, CHANNELS)
        for image in doc.images:
            if image.shape != shape or image.dtype != np.uint8:
                raise ValueError(f"{doc.name}: an image is {image.dtype} {image.shape}, not "
                                 f"uint8 {shape}")
        expanded = [t for i in ids for t in (self.span() if i == special[IMAGE] else [i])]
        patches = [np.zeros((0, self.patch_dim), np.uint8)]
        patches += [patchify(image, self.patch_size) for image in doc.images]
        return np.asarray(expanded, np.int32), np.concatenate(patches)


def missing_tokens(tokenizer: Tokenizer) -> str | None:
    """What the tokenizer lacks of the image tokens, in words; None if it has them all."""
    missing = [t for t in (IMAGE, IMAGE_END, PATCH) if t not in tokenizer.special]
    if not missing:
        return None
    return f"has no {', '.join(missing)} token; image sources need {IMAGE}, {IMAGE_END}, {PATCH}"


def _mixed_texts(texts: Sequence[str], share: float | None, image_documents: int) -> list[str]:
    """The text documents to mix with `image_documents` documents with images."""
    if share is None:
        return list(texts)
    if not 0 <= share < 1:
        raise ValueError(f"text_share: must be in [0, 1), got {share}")
    count = round(share / (1 - share) * image_documents)
    if count and not texts:
        raise ValueError(f"text_share: {share} needs text documents to mix in")
    return [texts[i % len(texts)] for i in range(count)]
