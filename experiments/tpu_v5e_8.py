"""A 1.24B dense decoder on one v5e-8 host (8 chips, 16 GiB HBM each), pure FSDP.

The `llama3_1b` preset (Llama-3.2-1B's dimensions without its long-context RoPE scaling)
with full remat, on C4 with the Llama 3 tokenizer (`tokenizers/llama3/tokenizer.json` in the
checkout, see tpu_setup/README.md). `jaxllm params experiments/tpu_v5e_8.py --devices 8`
prints the memory per chip: about 8 GiB of the 16.

    tpu_setup/launch.sh --bucket gs://B --experiment experiments/tpu_v5e_8.py --run v5e8
"""

import dataclasses

from jaxllm import Config, DataConfig, MeshConfig, TrainConfig, presets
from jaxllm.config import CheckpointConfig


def config() -> Config:
    return Config(
        model=dataclasses.replace(presets.llama3_1b(), remat="full"),
        mesh=MeshConfig(data=1, fsdp=8),
        data=DataConfig(source="tfds", name="c4/en:3.1.0", eval_split="validation",
                        tokenizer="tokenizers/llama3/tokenizer.json"),
        train=TrainConfig(steps=20_000, batch_size=16, seq_len=2048, learning_rate=3e-4,
                          warmup_steps=1000, log_every=50, eval_every=1000),
        checkpoint=CheckpointConfig(every=1000),
    )
