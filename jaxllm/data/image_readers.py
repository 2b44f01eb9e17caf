"""Documents with images from the offline image corpus, a folder of files or a TFDS dataset,
and `image_source`, which makes the `ImageTextSource` of a `DataConfig`.

Every image is converted to RGB and resized to the square `image_size` (the aspect ratio is
not kept) with Pillow, which reads an image file's size from its header before decoding it,
so an image of more than `data.max_image_pixels` pixels is refused undecoded. A missing,
unreadable or too large image is a `ConfigError` that names the image file and the JSONL
line (or the dataset example) that refers to it.
"""

from pathlib import Path

import jax
import numpy as np
from PIL import Image

from jaxllm.config import ConfigError, DataConfig
from jaxllm.data import readers
from jaxllm.data.image_sources import ImageDocument, ImageTextSource, missing_tokens
from jaxllm.data.images import IMAGE, ImageProblem
from jaxllm.data.tokenizer import Tokenizer


def image_source(data: DataConfig, *, tokenizer: Tokenizer, image_size: int, patch_size: int,
                 split: str | None = None) -> ImageTextSource:
    """The source of `split` (default `data.split`) of an image `data.source`, with
    `data.text_share` of reasoning-corpus documents mixed in."""
    split = data.split if split is None else split
    if data.source == "images":
        documents = corpus_documents(data, split, image_size=image_size)
    elif data.source == "image_folder":
        if split != data.split:
            raise ConfigError(f"data.split: JSONL files are one split, {data.split!r}; there "
                              f"is no {split!r}")
        documents = folder_documents(data, image_size=image_size)
    elif data.source == "image_tfds":
        documents = tfds_documents(data, split, image_size=image_size)
    else:
        raise ConfigError(f"data.source: {data.source!r} is not an image source")
    if missing := missing_tokens(tokenizer):
        raise ConfigError(f"data.tokenizer: {missing}")
    texts = readers.reasoning_texts(data, split) if data.text_share else ()
    try:
        return ImageTextSource(documents, tokenizer, image_size=image_size,
                               patch_size=patch_size, seed=data.seed, texts=texts,
                               text_share=data.text_share)
    except ValueError as error:  # a document whose text or image does not fit the source
        field = {"image_folder": "paths", "image_tfds": "name"}.get(data.source, "source")
        raise ConfigError(f"data.{field}: {error}") from None


def corpus_documents(data: DataConfig, split: str, *, image_size: int) -> list[ImageDocument]:
    """This process's documents of `split` of the offline image corpus, built on first use."""
    builder = corpus_builder(data, split, image_size=image_size)
    return _dataset_documents(builder, split, image_key="image", text_key="text",
                              what="the image corpus", image_size=image_size,
                              max_pixels=data.max_image_pixels)


def corpus_problems(data: DataConfig, split: str, *, image_size: int) -> list[ImageProblem]:
    """All problems of `split` of the offline image corpus, in order, the same on every
    process (for RL and evaluation), built on first use."""
    import tensorflow_datasets as tfds

    builder = corpus_builder(data, split, image_size=image_size)
    problems = []
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        thought = example["text"].decode().partition("<think>")[2].partition("</think>")[0]
        problems.append(ImageProblem(example["family"].decode(), example["question"].decode(),
                                     example["answer"].decode(), thought, example["image"]))
    return problems


def corpus_builder(data: DataConfig, split: str, *, image_size: int):
    """The prepared image corpus builder of `data`'s settings, after checking `split` and
    `data.data_dir`."""
    from jaxllm.data import image_corpus

    if split not in image_corpus.SPLITS:
        raise ConfigError(f"data.split: the image corpus has splits {image_corpus.SPLITS}, "
                          f"not {split!r}")
    readers.check_data_dir(data.data_dir)
    return image_corpus.prepare(
        data.data_dir, seed=data.seed, image_size=image_size, train_size=data.train_size,
        validation_size=data.validation_size, test_size=data.test_size)


def tfds_documents(data: DataConfig, split: str, *, image_size: int) -> list[ImageDocument]:
    """This process's documents of a prepared TFDS dataset `data.name`: features
    `data.image_key` and `data.text_key`."""
    builder = readers.tfds_builder(data)
    features = list(builder.info.features)
    for field in ("image_key", "text_key"):
        if getattr(data, field) not in features:
            raise ConfigError(f"data.{field}: {data.name!r} has no feature "
                              f"{getattr(data, field)!r}; it has {features}")
    return _dataset_documents(builder, split, image_key=data.image_key, text_key=data.text_key,
                              what=repr(data.name), image_size=image_size,
                              max_pixels=data.max_image_pixels)


def _dataset_documents(builder, split: str, *, image_key: str, text_key: str, what: str,
                       image_size: int, max_pixels: int) -> list[ImageDocument]:
    import tensorflow_datasets as tfds

    dataset = readers.as_dataset(builder, split, [image_key, text_key], what)
    documents = []
    for number, example in enumerate(tfds.as_numpy(dataset)):
        name = f"{what}, example {number} of this process's share of {split!r}"
        image = example[image_key]
        if image.shape[0] * image.shape[1] > max_pixels:
            raise ConfigError(f"data.max_image_pixels: {name}: the image has "
                              f"{image.shape[1]}x{image.shape[0]} pixels, more than "
                              f"{max_pixels}")
        image = resize(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image),
                       image_size)
        documents.append(ImageDocument(_with_marker(example[text_key].decode()), (image,), name))
    if not documents:
        raise ConfigError(f"data.split: {split!r} of {what} is empty for this process")
    return documents


def folder_documents(data: DataConfig, *, image_size: int) -> list[ImageDocument]:
    """This process's documents of the JSONL files `data.paths`: records of an image file
    `data.image_key`, relative to the JSONL file, and a text `data.text_key`."""
    records = []
    for path in readers.files(data.paths):
        for number, record in readers.jsonl_records(path):
            where = f"{path}:{number}"
            if not isinstance(record, dict) or not all(
                    isinstance(record.get(key), str) for key in (data.image_key, data.text_key)):
                raise ConfigError(f"data.paths: {where} is not a record with text fields "
                                  f"{data.image_key!r} and {data.text_key!r}")
            records.append((where, path.parent / record[data.image_key], record[data.text_key]))
    records = records[jax.process_index()::jax.process_count()]
    if not records:
        raise ConfigError(f"data.paths: {data.paths!r} holds no records for this process")
    return [ImageDocument(_with_marker(text),
                          (read_image(file, image_size=image_size,
                                      max_pixels=data.max_image_pixels, where=where),),
                          f"{file} ({where})")
            for where, file, text in records]


def read_image(path: Path, *, image_size: int, max_pixels: int, where: str) -> np.ndarray:
    """The image file `path`, which the record at `where` names, as uint8 [size, size, 3]."""
    if not path.is_file():
        raise ConfigError(f"data.paths: {where}: the image {path} does not exist")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ConfigError(f"data.max_image_pixels: {where}: the image {path} has "
                                  f"{width}x{height} pixels, more than {max_pixels}")
            return resize(image, image_size)
    except Image.DecompressionBombError as error:  # past Pillow's own limit
        raise ConfigError(f"data.max_image_pixels: {where}: the image {path} is too large: "
                          f"{error}") from None
    except OSError as error:  # not an image, or a truncated or corrupt one
        raise ConfigError(f"data.paths: {where}: the image {path} cannot be read: "
                          f"{error}") from None


def resize(image: Image.Image, image_size: int) -> np.ndarray:
    """A Pillow image as RGB, resized to [image_size, image_size, 3] uint8."""
    square = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(square, np.uint8)


def _with_marker(text: str) -> str:
    """A text with the `<image>` marker where it places its image, else first."""
    return text if IMAGE in text else IMAGE + text
