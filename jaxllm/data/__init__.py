"""Data sources, tokenizers, packing and the reasoning task families.

A source has `tokenizer` and `batches(batch_size, seq_len, start=0, mask_prompt=False)`, which
yields this process's rows of each batch as numpy arrays: inputs, targets, segment_ids,
positions, loss_mask (see `jaxllm.data.sources`), and `patches` for an image source
(`jaxllm.data.image_sources`).
"""

from jaxllm.config import IMAGE_SOURCES, Config, ConfigError, ConstitutionConfig, DataConfig
from jaxllm.data import assistant, readers, tasks
from jaxllm.data.arithmetic import ArithmeticSource
from jaxllm.data.image_sources import PATCH, ImageTextSource
from jaxllm.data.sources import ChatSource, DocumentSource
from jaxllm.data.tokenizer import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)


def make_source(
    config: Config, split: str | None = None
) -> ArithmeticSource | DocumentSource | ChatSource | ImageTextSource:
    """The source of `split` (default `config.data.split`), checked against the model's vocabulary.

    An image source cuts its images as `config.model.vision` says. Raises ConfigError for a
    missing dataset or file, an empty split or a bad tokenizer.
    """
    data = config.data
    split = data.split if split is None else split
    tokenizer = checked_tokenizer(config)
    if data.source in IMAGE_SOURCES:
        from jaxllm.data.image_readers import image_source  # Pillow, only for images

        vision = config.model.vision
        return image_source(data, tokenizer=tokenizer, image_size=vision.image_size,
                            patch_size=vision.patch_size, split=split)
    if data.source == "arithmetic":
        if data.tokenizer != "byte":
            raise ConfigError("data.tokenizer: the arithmetic source is byte-level")
        return ArithmeticSource(data.seed, split)
    if data.source == "chat":
        return _chat_source(data, split, tokenizer)
    if data.source == "reasoning":
        texts = readers.reasoning_texts(data, split)
        if data.effort_documents:
            texts = tasks.effort_documents(texts)
        if split == data.split and data.assistant_documents:
            texts += assistant.documents(
                data.seed, data.assistant_documents, difficulty=data.difficulty,
                cfg=config.constitution or ConstitutionConfig())
        if split == data.split and data.tool_documents:
            texts += tool_documents(data)
    elif data.source == "tfds":
        texts = readers.tfds_texts(data, split)
    else:
        if split != data.split:
            raise ConfigError(f"data.split: text files are one split, {data.split!r}; there is "
                              f"no {split!r} (set data.eval_split=none to skip evaluation)")
        texts = readers.text_file_texts(data)
    return DocumentSource(texts, tokenizer, data.seed)


def checked_tokenizer(config: Config) -> Tokenizer:
    """`config.data.tokenizer`, loaded and checked against `config.model`: its vocabulary
    fits `model.vocab_size`, and a model with images has its `<patch>` token at
    `model.vision.patch_token_id`. Raises ConfigError naming the field."""
    try:
        tokenizer = load_tokenizer(config.data.tokenizer)
    except (ValueError, OSError) as error:
        raise ConfigError(f"data.tokenizer: {error}") from None
    model = config.model
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens ({config.data.tokenizer}); set model.vocab_size >= "
            f"{tokenizer.vocab_size}"
        )
    patch = tokenizer.special.get(PATCH)
    if model.vision.image_size and patch != model.vision.patch_token_id:
        found = "has no <patch> token" if patch is None else f"has <patch> at id {patch}"
        raise ConfigError(f"model.vision.patch_token_id: {model.vision.patch_token_id}, but the "
                          f"tokenizer {config.data.tokenizer} {found}")
    return tokenizer


def _chat_source(data: DataConfig, split: str, tokenizer: Tokenizer) -> ChatSource:
    """The conversations of the JSONL files or TFDS dataset, rendered by the tokenizer."""
    if data.paths:
        if split != data.split:
            raise ConfigError(f"data.split: JSONL files are one split, {data.split!r}; there "
                              f"is no {split!r}")
        conversations = readers.chat_file_conversations(data)
    else:
        conversations = readers.tfds_conversations(data, split)
    try:
        return ChatSource(conversations, tokenizer, data.seed)
    except ValueError as error:  # a chat template that fails on a conversation
        raise ConfigError(f"data.tokenizer: {error}") from None


def tool_documents(data: DataConfig) -> list[str]:
    """`tasks.tool_document` of the first `data.tool_documents` problems of the train split,
    those of the families with a tool: the call syntax, on problems held out of evaluation."""
    problems = [p for p in readers.reasoning_problems(data, "train")
                if p.family in tasks.TOOL_FAMILIES]
    return [tasks.tool_document(p) for p in problems[:data.tool_documents]]


__all__ = [
    "ArithmeticSource",
    "ByteTokenizer",
    "ChatSource",
    "DocumentSource",
    "HuggingFaceTokenizer",
    "ImageTextSource",
    "SentencePieceTokenizer",
    "Tokenizer",
    "checked_tokenizer",
    "load_tokenizer",
    "make_source",
]
