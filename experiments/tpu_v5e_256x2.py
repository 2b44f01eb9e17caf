"""Mixtral 8x7B on two v5e-256 slices (multislice: 512 chips, 16 GiB HBM each).

The data axis spans the two slices over DCN (`mesh.slices=2`); within each slice FSDP
shards every weight and both AdamW moments 256 ways over ICI, so only gradients cross
DCN. Full remat, one row of 4096 tokens per chip, on C4 with Mixtral's SentencePiece
tokenizer (`tokenizers/mixtral/tokenizer.model` in the checkout, see tpu_setup/README.md).
`jaxllm params experiments/tpu_v5e_256x2.py --devices 512` prints the memory per chip.

    tpu_setup/launch.sh --nodes 2 --bucket gs://B --experiment experiments/tpu_v5e_256x2.py
"""

import dataclasses

from jaxllm import Config, DataConfig, MeshConfig, TrainConfig, presets
from jaxllm.config import CheckpointConfig


def config() -> Config:
    return Config(
        model=dataclasses.replace(presets.mixtral_8x7b(), remat="full"),
        mesh=MeshConfig(data=2, fsdp=256, slices=2),
        data=DataConfig(source="tfds", name="c4/en:3.1.0", eval_split="validation",
                        tokenizer="tokenizers/mixtral/tokenizer.model"),
        train=TrainConfig(steps=50_000, batch_size=512, seq_len=4096, learning_rate=2e-4,
                          warmup_steps=2000, log_every=50, eval_every=1000),
        checkpoint=CheckpointConfig(every=500),
    )
