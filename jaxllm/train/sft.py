"""Supervised fine-tuning: the pretraining phase on chat data (`data.source=chat`), whose
loss mask keeps only assistant tokens (`jaxllm.data.chat`)."""

from collections.abc import Callable

from jaxllm import config as config_lib
from jaxllm.data import make_source
from jaxllm.train.loop import pretrain


def sft(
    config: config_lib.Config, log: Callable[[str], None] = print, stop_after: int | None = None
) -> list[dict]:
    """Fine-tunes `config.model` on `config.data`'s conversations, from `config.init_from`'s
    weights (or the workdir's checkpoints); returns this run's logged metrics, as `pretrain`.

    Every record is read and rendered before the run writes to its workdir, so a malformed
    one stops it with nothing written.
    """
    config = config_lib.validate(config)
    if config.data.source != "chat":
        raise config_lib.ConfigError(
            f"data.source: SFT trains on chat records, not {config.data.source!r}; set "
            "data.source=chat with data.paths=FILE.jsonl or data.name=TFDS_DATASET"
        )
    return pretrain(config, log=log, stop_after=stop_after, source=make_source(config))
