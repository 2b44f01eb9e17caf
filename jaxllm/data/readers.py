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
from collections.abc import Iterator
from pathlib import Path

import jax

from jaxllm.config import ConfigError, DataConfig
from jaxllm.data import chat, tasks


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
    check_data_dir(data.data_dir)
    return corpus.prepare(
        data.data_dir, seed=data.seed, difficulty=data.difficulty, train_size=data.train_size,
        validation_size=data.validation_size, test_size=data.test_size,
    )


def tfds_texts(data: DataConfig, split: str) -> list[str]:
    """This process's documents of a prepared TFDS dataset: `data.name`, feature `data.text_key`."""
    builder = tfds_builder(data)
    features = list(builder.info.features)
    if data.text_key not in features:
        raise ConfigError(f"data.text_key: {data.name!r} has no feature {data.text_key!r}; "
                          f"it has {features}")
    return _read_texts(builder, split, data.text_key, repr(data.name))


def tfds_conversations(data: DataConfig, split: str) -> list[list[dict]]:
    """This process's conversations of a prepared TFDS dataset `data.name`: its feature
    `data.messages_key` (a sequence of role and content texts), else its text features
    `data.prompt_key` and `data.response_key`."""
    import tensorflow_datasets as tfds

    builder = tfds_builder(data)
    features = list(builder.info.features)
    keys = [data.messages_key] if data.messages_key in features else [data.prompt_key,
                                                                       data.response_key]
    if not set(keys) <= set(features):
        raise ConfigError(f"data.messages_key: {data.name!r} has neither a feature "
                          f"{data.messages_key!r} nor {data.prompt_key!r} and "
                          f"{data.response_key!r}; it has {features}")
    dataset = as_dataset(builder, split, keys, repr(data.name))
    conversations = []
    for number, example in enumerate(tfds.as_numpy(dataset)):
        try:
            conversations.append(chat.conversation(_record(example), **_chat_keys(data)))
        except ValueError as error:
            raise ConfigError(f"data.name: {data.name!r}, example {number} of this process's "
                              f"share of {split!r}: {error}") from None
    if not conversations:
        raise ConfigError(f"data.split: {split!r} of {data.name!r} is empty for this process")
    return conversations


def _record(example: dict) -> dict:
    """A TFDS example as JSON-like data: texts as str, a sequence of dicts as a list of dicts."""

    def plain(value):
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, dict):  # a Sequence of dicts decodes to a dict of sequences
            columns = {key: plain(column) for key, column in value.items()}
            return [dict(zip(columns, row)) for row in zip(*columns.values())]
        return [plain(item) for item in value] if hasattr(value, "__len__") else value

    return {key: plain(value) for key, value in example.items()}


def tfds_builder(data: DataConfig):
    """The builder of the prepared TFDS dataset `data.name`."""
    import tensorflow_datasets as tfds

    import jaxllm.data.corpus  # noqa: F401  (registers jaxllm_reasoning with TFDS)
    import jaxllm.data.image_corpus  # noqa: F401  (registers jaxllm_images with TFDS)

    check_data_dir(data.data_dir)
    try:
        builder = tfds.builder(data.name, data_dir=data.data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as error:
        raise ConfigError(f"data.name: {_first_line(error)}") from None
    if not builder.is_prepared():
        raise ConfigError(
            f"data.name: {data.name!r} is not prepared in {builder.data_dir_root}; prepare it "
            f"first, e.g. `tfds build {data.name} --data_dir {builder.data_dir_root}`"
        )
    return builder


def text_file_texts(data: DataConfig) -> list[str]:
    """This process's documents of `data.paths`: comma-separated files or glob patterns.

    A `.jsonl` file holds one document per line, in the field `data.text_key`; any other file
    holds documents separated by blank lines.
    """
    texts = [text for path in files(data.paths) for text in _documents(path, data.text_key)]
    texts = texts[jax.process_index()::jax.process_count()]
    if not texts:
        raise ConfigError(f"data.paths: {data.paths!r} holds no documents for this process")
    return texts


def chat_file_conversations(data: DataConfig) -> list[list[dict]]:
    """This process's conversations of the JSONL files `data.paths` (`chat.conversation`).

    A record that is not a conversation is refused, naming its file and line.
    """
    conversations = []
    for path in files(data.paths):
        for number, record in jsonl_records(path):
            try:
                conversations.append(chat.conversation(record, **_chat_keys(data)))
            except ValueError as error:
                raise ConfigError(f"data.paths: {path}:{number}: {error}") from None
    conversations = conversations[jax.process_index()::jax.process_count()]
    if not conversations:
        raise ConfigError(f"data.paths: {data.paths!r} holds no records for this process")
    return conversations


def _chat_keys(data: DataConfig) -> dict[str, str]:
    return dict(messages_key=data.messages_key, prompt_key=data.prompt_key,
                response_key=data.response_key)


def files(patterns: str) -> list[Path]:
    """The files of comma-separated names or glob patterns, each of which must match."""
    files = []
    for pattern in patterns.split(","):
        matches = sorted(glob.glob(pattern.strip()))
        if not matches:
            raise ConfigError(f"data.paths: {pattern.strip()!r} matches no file")
        files += map(Path, matches)
    return files


def _documents(path: Path, text_key: str) -> list[str]:
    if path.suffix != ".jsonl":
        return [doc.strip() for doc in re.split(r"\n\s*\n", path.read_text()) if doc.strip()]
    texts = []
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise ConfigError(f"data.text_key: {path}:{number} has no text field {text_key!r}")
        texts.append(record[text_key])
    return texts


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, JSON value) of each non-blank line of a JSONL file."""
    for number, line in enumerate(path.read_text().split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"data.paths: {path}:{number} is not JSON ({error})") from None


def check_data_dir(data_dir: str | None) -> None:
    from etils import epath

    if data_dir is not None and not epath.Path(data_dir).exists():
        raise ConfigError(f"data.data_dir: {data_dir!r} does not exist")


def _read_texts(builder, split: str, key: str, what: str) -> list[str]:
    """The `key` feature of this process's even share of `split`, decoded to str."""
    import tensorflow_datasets as tfds

    dataset = as_dataset(builder, split, [key], what)
    texts = [text.decode() for batch in tfds.as_numpy(dataset.batch(4096)) for text in batch[key]]
    if not texts:
        raise ConfigError(f"data.split: {split!r} of {what} is empty for process "
                          f"{jax.process_index()} of {jax.process_count()}")
    return texts


def as_dataset(builder, split: str, keys: list[str], what: str):
    """The `keys` features of this process's even share of `split`, as a tf.data dataset."""
    import tensorflow_datasets as tfds

    for part in split.split("+"):
        if part.split("[")[0].strip() not in builder.info.splits:
            raise ConfigError(f"data.split: {what} has no split {part!r}; "
                              f"it has {list(builder.info.splits)}")
    process = f"process {jax.process_index()} of {jax.process_count()}"
    try:
        with _without_dtype_deprecation_log():
            return builder.as_dataset(
                split=tfds.split_for_jax_process(split),
                decoders=tfds.decode.PartialDecoding({key: True for key in keys}),
                shuffle_files=False,
            )
    except ValueError as error:  # e.g. an empty slice: "Instruction [] corresponds to no data!"
        raise ConfigError(f"data.split: cannot read {split!r} of {what} for {process}: "
                          f"{error}") from None


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
