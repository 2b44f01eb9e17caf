"""The offline image-text corpus: a TFDS dataset builder over `jaxllm.data.images`.

Like the reasoning corpus (`corpus`), it generates train, validation and test splits from a
seed, with no network, built once into a TFDS data_dir. Problems are drawn from the families
in turn at random; a problem's split is a function of the hash of its question and pixels,
and problems are deduplicated on the same key, so no question with its picture appears in
two splits.

Features: image (uint8 [image_size, image_size, 3]), family, question, answer, and text
(the `images.document`, with the `<image>` marker). Importing this module imports
TensorFlow; import it lazily.
"""

import dataclasses
import hashlib

import numpy as np
import tensorflow_datasets as tfds

from jaxllm.data import images
from jaxllm.data.corpus import (
    SPLITS, GeneratedConfig, build_once, draw_splits, named_config, spell_name,
)


@dataclasses.dataclass(eq=False)
class ImagesConfig(GeneratedConfig):
    """The generator settings of the image corpus."""

    image_size: int = 24


_NAME_FIELDS = (("seed", "seed"), ("image_size", "size"), ("train_size", ""),
                ("validation_size", ""), ("test_size", ""))


def config_name(
    seed: int = 0,
    image_size: int = 24,
    train_size: int = 20_000,
    validation_size: int = 500,
    test_size: int = 500,
) -> str:
    """The builder config name of these settings, e.g. "seed0_size24_20000_500_500"."""
    return spell_name(_NAME_FIELDS, locals())


class JaxllmImages(tfds.core.GeneratorBasedBuilder):
    """Rendered pictures with a question and a verifiable answer (`jaxllm.data.images`).

    Every config name `config_name(...)` spells is valid, e.g.
    `tfds.builder("jaxllm_images/seed1_size32_5000_100_100")`.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [named_config(ImagesConfig, _NAME_FIELDS, config_name())]

    @classmethod
    def get_builder_config(cls, name, version=None):
        return (super().get_builder_config(name, version)
                or named_config(ImagesConfig, _NAME_FIELDS, name))

    def _info(self) -> tfds.core.DatasetInfo:
        size, text = self.builder_config.image_size, tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3)),
                "family": text,
                "question": text,
                "answer": text,
                "text": text,
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to download
        splits = split_problems(self.builder_config)
        return {name: self._generate_examples(splits[name]) for name in SPLITS}

    def _generate_examples(self, problems):
        for i, problem in enumerate(problems):
            yield i, {"image": problem.image, "family": problem.family,
                      "question": problem.question, "answer": problem.answer,
                      "text": images.document(problem)}


def split_problems(config: ImagesConfig) -> dict[str, list[images.ImageProblem]]:
    """Distinct problems, drawn until each split is full; the hash of a problem's question
    and pixels picks its split."""
    rng = np.random.default_rng(config.seed)

    def draw() -> images.ImageProblem:
        family = images.FAMILIES[int(rng.integers(len(images.FAMILIES)))]
        return images.generate(family, rng, config.image_size)

    return draw_splits(config.sizes, draw, key=problem_key,
                       settings=f"image_size {config.image_size}")


def problem_key(problem: images.ImageProblem) -> str:
    """What makes a problem distinct: its question and its pixels."""
    return problem.question + hashlib.sha256(problem.image.tobytes()).hexdigest()


def prepare(data_dir: str | None = None, **settings) -> JaxllmImages:
    """The corpus builder for `settings` (see `config_name`), built on first use, by
    process 0 first in a multi-process run (`corpus.build_once`)."""
    return build_once(JaxllmImages, config_name(**settings), data_dir)
