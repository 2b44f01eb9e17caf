"""Llama-3-8B on one v5p-128 pod slice (64 chips over 16 hosts, 95 GiB HBM each).

Pure FSDP over all 64 chips (each holds 1/64 of the params, grads and AdamW moments),
full remat, 2 rows of 8192 tokens per chip, on C4 with the Llama 3 tokenizer
(`tokenizers/llama3/tokenizer.json` in the checkout, see tpu_setup/README.md).
`jaxllm params experiments/tpu_v5p_128.py --devices 64` prints the memory per chip.

    tpu_setup/launch.sh --bucket gs://B --experiment experiments/tpu_v5p_128.py --run v5p128
"""

import dataclasses

from jaxllm import Config, DataConfig, MeshConfig, TrainConfig, presets
from jaxllm.config import CheckpointConfig


def config() -> Config:
    return Config(
        model=dataclasses.replace(presets.llama3_8b(), remat="full"),
        mesh=MeshConfig(data=1, fsdp=64),
        data=DataConfig(source="tfds", name="c4/en:3.1.0", eval_split="validation",
                        tokenizer="tokenizers/llama3/tokenizer.json"),
        train=TrainConfig(steps=50_000, batch_size=128, seq_len=8192, learning_rate=3e-4,
                          warmup_steps=2000, log_every=50, eval_every=1000),
        checkpoint=CheckpointConfig(every=500),
    )
