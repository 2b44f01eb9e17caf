"""The offline reasoning corpus: a TFDS dataset builder over `jaxllm.data.tasks`.

It generates train, validation and test splits from a seed, with no network, and is built once
into a TFDS data_dir (default `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`), then reused.
A question's split is a function of its hash, and questions are deduplicated across splits,
so no validation or test problem appears in train.

Features: text (the `tasks.document`), family, question, answer, numbers, and target (-1 for
families without one). Importing this module imports TensorFlow; import it lazily.
"""

import dataclasses
import functools
import hashlib
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from jaxllm.data import tasks

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(eq=False)
class GeneratedConfig(tfds.core.BuilderConfig):
    """A generated corpus's seed and split sizes; each distinct setting is its own builder
    config name."""

    seed: int = 0
    train_size: int = 20_000
    validation_size: int = 500
    test_size: int = 500

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "validation": self.validation_size,
                "test": self.test_size}


@dataclasses.dataclass(eq=False)
class ReasoningConfig(GeneratedConfig):
    """The generator settings of the reasoning corpus."""

    difficulty: int = 2


# The config name's parts: each field's value after its label, joined by "_".
_NAME_FIELDS = (("seed", "seed"), ("difficulty", "difficulty"), ("train_size", ""),
                ("validation_size", ""), ("test_size", ""))


def config_name(
    seed: int = 0,
    difficulty: int = 2,
    train_size: int = 20_000,
    validation_size: int = 500,
    test_size: int = 500,
) -> str:
    """The builder config name of these settings, e.g. "seed0_difficulty2_20000_500_500"."""
    return spell_name(_NAME_FIELDS, locals())


def spell_name(fields: tuple[tuple[str, str], ...], settings: dict[str, int]) -> str:
    """The config name of `settings`: each of `fields` (name, label) as label and value."""
    return "_".join(f"{label}{settings[field]}" for field, label in fields)


@functools.cache
def named_config(config_class: type, fields: tuple[tuple[str, str], ...],
                 name: str) -> GeneratedConfig | None:
    """The config a name spells out (`spell_name`), or None; one object per name, as TFDS
    requires."""
    match = re.fullmatch("_".join(rf"{label}(-?\d+)" for _, label in fields), name)
    if match is None:
        return None
    return config_class(name=name, **{field: int(value) for (field, _), value
                                      in zip(fields, match.groups())})


class JaxllmReasoning(tfds.core.GeneratorBasedBuilder):
    """Prompt, `<think>` worked solution and `<answer>` for the reasoning task families.

    Every config name `config_name(...)` spells is valid, so the corpus of any settings can
    be loaded by name, e.g. `tfds.builder("jaxllm_reasoning/seed1_difficulty3_5000_100_100")`.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [named_config(ReasoningConfig, _NAME_FIELDS, config_name())]

    @classmethod
    def get_builder_config(cls, name, version=None):
        return (super().get_builder_config(name, version)
                or named_config(ReasoningConfig, _NAME_FIELDS, name))

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "text": text,
                "family": text,
                "question": text,
                "answer": text,
                "numbers": tfds.features.Sequence(np.int64),
                "target": np.int64,
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to download
        splits = split_problems(self.builder_config)
        return {name: self._generate_examples(splits[name]) for name in SPLITS}

    def _generate_examples(self, problems):
        for i, problem in enumerate(problems):
            yield i, to_example(problem)


def split_problems(config: ReasoningConfig) -> dict[str, list[tasks.Problem]]:
    """Distinct problems, drawn until each split is full; a question's hash picks its split."""
    rng = np.random.default_rng(config.seed)

    def draw() -> tasks.Problem:
        family = tasks.FAMILIES[int(rng.integers(len(tasks.FAMILIES)))]
        return tasks.generate(family, rng, config.difficulty)

    return draw_splits(config.sizes, draw, key=lambda problem: problem.question,
                       settings=f"difficulty {config.difficulty}")


def draw_splits(sizes: dict[str, int], draw: Callable[[], Any], *, key: Callable[[Any], str],
                settings: str) -> dict[str, list]:
    """Items of `draw()` with distinct keys, until each split holds its size; the hash of an
    item's key picks its split (`split_of`)."""
    total = sum(sizes.values())
    splits = {name: [] for name in SPLITS}
    seen = set()
    for _ in range(50 * total):
        if all(len(splits[name]) == sizes[name] for name in SPLITS):
            return splits
        item = draw()
        if key(item) in seen:
            continue
        seen.add(key(item))
        name = split_of(key(item), sizes, total)
        if len(splits[name]) < sizes[name]:
            splits[name].append(item)
    raise ValueError(f"{settings} has too few distinct problems for splits of {sizes}")


def split_of(key: str, sizes: dict[str, int], total: int) -> str:
    """test, validation or train, in proportion to the split sizes, by the key's hash."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % total
    if bucket < sizes["test"]:
        return "test"
    return "validation" if bucket < sizes["test"] + sizes["validation"] else "train"


def to_example(problem: tasks.Problem) -> dict:
    """A problem as the builder's feature dict."""
    return {
        "text": tasks.document(problem),
        "family": problem.family,
        "question": problem.question,
        "answer": problem.answer,
        "numbers": list(problem.numbers),
        "target": -1 if problem.target is None else problem.target,
    }


def from_example(example: dict) -> tasks.Problem:
    """The `tasks.Problem` of one example read back through `tfds.as_numpy`."""
    target = int(example["target"])
    return tasks.Problem(
        family=example["family"].decode(),
        question=example["question"].decode(),
        answer=example["answer"].decode(),
        numbers=tuple(int(n) for n in example["numbers"]),
        target=None if target == -1 else target,
    )


def prepare(data_dir: str | None = None, **settings) -> JaxllmReasoning:
    """The corpus builder for `settings` (see `config_name`), built on first use.

    In a multi-process run, process 0 builds first and the others wait for it, so processes
    that share a data_dir never build into it at once; every process must call this.
    """
    return build_once(JaxllmReasoning, config_name(**settings), data_dir)


def build_once(builder_class: type, name: str, data_dir: str | None):
    """The builder of config `name`, built into `data_dir` on first use (see `prepare`)."""
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            builder_class(config=name, data_dir=data_dir).download_and_prepare()
        multihost_utils.sync_global_devices(f"{builder_class.name}/{name} prepared")
    builder = builder_class(config=name, data_dir=data_dir)  # reads what is there now
    builder.download_and_prepare()
    return builder
