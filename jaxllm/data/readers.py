"""Reading documents from the reasoning corpus, a TFDS dataset or local files.

The text readers return this process's share of the documents; `reasoning_problems` returns a
whole split as `tasks.Problem`s for RL and evaluation. Every reader turns a bad dataset, split,
directory or file into a `ConfigError` that names the `data.*` field at fault. TensorFlow is
imported only when a TFDS source is read.
"""

import contextlib
import glob
import json
import logging
import re
from pathlib import Path

import jax

from jaxllm.config import ConfigError, DataConfig
from jaxllm.data import tasks


def reasoning_texts(data: DataConfig, split: str) -> list[str]:
    """This process's documents of `split` of the offline corpus, built on first use."""
    return _read_texts(_reasoning_builder(data, split), split, "text", "the reasoning corpus")


def reasoning_problems(data: DataConfig, split: str) -> list[tasks.Problem]:
    """All problems of `split` of the offline corpus, in order, the same on every process."""
    import tensorflow_datasets as tfds

    from jaxllm.data import corpus

    dataset = _reasoning_builder(data, split).as_dataset(split=split, shuffle_files=False)
    problems = []
    for batch in tfds.as_numpy(dataset.ragged_batch(4096)):
        batch["numbers"] = batch["numbers"].to_list()  # ragged: one list per example
        problems += [corpus.from_example({k: v[i] for k, v in batch.items()})
                     for i in range(len(batch["numbers"]))]
    return problems


def _reasoning_builder(data: DataConfig, split: str):
    """The prepared corpus builder of `data`'s settings, after checking `split` and data_dir."""
    from jaxllm.data import corpus

    if split not in corpus.SPLITS:
        raise ConfigError(f"data.split: the reasoning corpus has splits {corpus.SPLITS}, "
                          f"not {split!r}")
    _check_data_dir(data.data_dir)
    return corpus.prepare(
        data.data_dir, seed=data.seed, difficulty=data.difficulty, train_size=data.train_size,
        validation_size=data.validation_size, test_size=data.test_size,
    )


def tfds_texts(data: DataConfig, split: str) -> list[str]:
    """This process's documents of a prepared TFDS dataset: `data.name`, feature `data.text_key`."""
    import tensorflow_datasets as tfds

    import jaxllm.data.corpus  # noqa: F401  (registers jaxllm_reasoning with TFDS)

    _check_data_dir(data.data_dir)
    try:
        builder = tfds.builder(data.name, data_dir=data.data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as error:
        raise ConfigError(f"data.name: {_first_line(error)}") from None
    if not builder.is_prepared():
        raise ConfigError(
            f"data.name: {data.name!r} is not prepared in {builder.data_dir_root}; prepare it "
            f"first, e.g. `tfds build {data.name} --data_dir {builder.data_dir_root}`"
        )
    features = list(builder.info.features)
    if data.text_key not in features:
        raise ConfigError(f"data.text_key: {data.name!r} has no feature {data.text_key!r}; "
                          f"it has {features}")
    return _read_texts(builder, split, data.text_key, repr(data.name))


def text_file_texts(data: DataConfig) -> list[str]:
    """This process's documents of `data.paths`: comma-separated files or glob patterns.

    A `.jsonl` file holds one document per line, in the field `data.text_key`; any other file
    holds documents separated by blank lines.
    """
    files = []
    for pattern in data.paths.split(","):
        matches = sorted(glob.glob(pattern.strip()))
        if not matches:
            raise ConfigError(f"data.paths: {pattern.strip()!r} matches no file")
        files += matches
    texts = [text for path in files for text in _documents(Path(path), data.text_key)]
    texts = texts[jax.process_index()::jax.process_count()]
    if not texts:
        raise ConfigError(f"data.paths: {data.paths!r} holds no documents for this process")
    return texts


def _documents(path: Path, text_key: str) -> list[str]:
    if path.suffix != ".jsonl":
        return [doc.strip() for doc in re.split(r"\n\s*\n", path.read_text()) if doc.strip()]
    texts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"data.paths: {path}:{number} is not JSON ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise ConfigError(f"data.text_key: {path}:{number} has no text field {text_key!r}")
        texts.append(record[text_key])
    return texts


def _check_data_dir(data_dir: str | None) -> None:
    from etils import epath

    if data_dir is not None and not epath.Path(data_dir).exists():
        raise ConfigError(f"data.data_dir: {data_dir!r} does not exist")


def _read_texts(builder, split: str, key: str, what: str) -> list[str]:
    """The `key` feature of this process's even share of `split`, decoded to str."""
    import tensorflow_datasets as tfds

    for part in split.split("+"):
        if part.split("[")[0].strip() not in builder.info.splits:
            raise ConfigError(f"data.split: {what} has no split {part!r}; "
                              f"it has {list(builder.info.splits)}")
    process = f"process {jax.process_index()} of {jax.process_count()}"
    try:
        with _without_dtype_deprecation_log():
            dataset = builder.as_dataset(
                split=tfds.split_for_jax_process(split),
                decoders=tfds.decode.PartialDecoding({key: True}),
                shuffle_files=False,
            )
    except ValueError as error:  # e.g. an empty slice: "Instruction [] corresponds to no data!"
        raise ConfigError(f"data.split: cannot read {split!r} of {what} for {process}: "
                          f"{error}") from None
    texts = [text.decode() for batch in tfds.as_numpy(dataset.batch(4096)) for text in batch[key]]
    if not texts:
        raise ConfigError(f"data.split: {split!r} of {what} is empty for {process}")
    return texts


@contextlib.contextmanager
def _without_dtype_deprecation_log():
    """Drops the "`FeatureConnector.dtype` is deprecated" record that TFDS's own
    `PartialDecoding` logs through absl (a log record, not a Python warning) on every read."""
    logger = logging.getLogger("absl")

    def keep(record: logging.LogRecord) -> bool:
        return "FeatureConnector.dtype` is deprecated" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]
