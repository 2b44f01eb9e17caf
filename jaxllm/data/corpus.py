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

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from jaxllm.data import tasks

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(eq=False)
class ReasoningConfig(tfds.core.BuilderConfig):
    """The generator settings; each distinct setting is its own builder config name."""

    seed: int = 0
    difficulty: int = 2
    train_size: int = 20_000
    validation_size: int = 500
    test_size: int = 500

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "validation": self.validation_size,
                "test": self.test_size}


def config_name(
    seed: int = 0,
    difficulty: int = 2,
    train_size: int = 20_000,
    validation_size: int = 500,
    test_size: int = 500,
) -> str:
    """The builder config name of these settings, e.g. "seed0_difficulty2_20000_500_500"."""
    return f"seed{seed}_difficulty{difficulty}_{train_size}_{validation_size}_{test_size}"


_CONFIG_NAME = re.compile(r"seed(-?\d+)_difficulty(\d+)_(\d+)_(\d+)_(\d+)")


@functools.cache
def _named_config(name: str) -> ReasoningConfig | None:
    """The config a name spells out; one object per name, as TFDS requires."""
    match = _CONFIG_NAME.fullmatch(name)
    if match is None:
        return None
    seed, difficulty, train, validation, test = map(int, match.groups())
    return ReasoningConfig(name=name, seed=seed, difficulty=difficulty, train_size=train,
                           validation_size=validation, test_size=test)


class JaxllmReasoning(tfds.core.GeneratorBasedBuilder):
    """Prompt, `<think>` worked solution and `<answer>` for the reasoning task families.

    Every config name `config_name(...)` spells is valid, so the corpus of any settings can
    be loaded by name, e.g. `tfds.builder("jaxllm_reasoning/seed1_difficulty3_5000_100_100")`.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [_named_config(config_name())]

    @classmethod
    def get_builder_config(cls, name, version=None):
        return super().get_builder_config(name, version) or _named_config(name)

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
    sizes = config.sizes
    total = sum(sizes.values())
    splits = {name: [] for name in SPLITS}
    rng = np.random.default_rng(config.seed)
    seen = set()
    for _ in range(50 * total):
        if all(len(splits[name]) == sizes[name] for name in SPLITS):
            return splits
        family = tasks.FAMILIES[int(rng.integers(len(tasks.FAMILIES)))]
        problem = tasks.generate(family, rng, config.difficulty)
        if problem.question in seen:
            continue
        seen.add(problem.question)
        name = _split_of(problem.question, sizes, total)
        if len(splits[name]) < sizes[name]:
            splits[name].append(problem)
    raise ValueError(
        f"difficulty {config.difficulty} has too few distinct problems for splits of {sizes}"
    )


def _split_of(question: str, sizes: dict[str, int], total: int) -> str:
    """test, validation or train, in proportion to the split sizes, by the question's hash."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "little") % total
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
    name = config_name(**settings)
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            JaxllmReasoning(config=name, data_dir=data_dir).download_and_prepare()
        multihost_utils.sync_global_devices(f"jaxllm_reasoning/{name} prepared")
    builder = JaxllmReasoning(config=name, data_dir=data_dir)  # reads what is there now
    builder.download_and_prepare()
    return builder
