"""Data sources. A source has `tokenizer` and `batches(batch_size, seq_len)`, which yields
dicts of [batch, seq_len] numpy arrays: inputs, targets, segment_ids, positions, loss_mask."""

from jaxllm.config import Config, ConfigError
from jaxllm.data.arithmetic import ArithmeticSource
from jaxllm.data.tokenizer import ByteTokenizer

SOURCES = {"arithmetic": ArithmeticSource}


def make_source(config: Config):
    """The data source the config names, checked against the model's vocabulary."""
    source = SOURCES[config.data.source](seed=config.data.seed)
    if source.tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
            f"{source.tokenizer.vocab_size} tokens"
        )
    return source


__all__ = ["ArithmeticSource", "ByteTokenizer", "make_source"]
