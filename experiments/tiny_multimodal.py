"""A tiny early-fusion model (docs/multimodal.md): tiny_dense reading 24-pixel images as 36
patch tokens of 4 x 4 pixels, trained from the first step on the synthetic image corpus
(`data.source=images`: colours, shapes, counts, digits, sums) with a quarter of the documents
text-only reasoning problems mixed in. Both corpora are built on first use into `data.data_dir`.

    jaxllm pretrain experiments/tiny_multimodal.py train.steps=50 workdir=runs/mm
    jaxllm generate runs/mm --image picture.png --prompt "What colour is the shape?"
"""

import dataclasses

from jaxllm import Config, DataConfig, TrainConfig, presets
from jaxllm.config import VisionConfig


def config() -> Config:
    return Config(
        model=dataclasses.replace(presets.tiny_dense(),
                                  vision=VisionConfig(image_size=24, patch_size=4)),
        data=DataConfig(source="images", seed=0, text_share=0.25),
        train=TrainConfig(steps=300, batch_size=16, seq_len=128, learning_rate=3e-3,
                          warmup_steps=20),
        workdir="runs/tiny_multimodal",
    )
