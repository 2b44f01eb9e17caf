"""A narrower, shallower student of the tiny dense model, distilled on the same corpus.

    jaxllm pretrain experiments/tiny_dense.py workdir=runs/tiny_dense       # the teacher
    jaxllm distill experiments/tiny_distill.py distill.teacher=runs/tiny_dense
"""

import dataclasses

from jaxllm import Config, DataConfig, TrainConfig, presets
from jaxllm.config import DistillConfig


def config() -> Config:
    student = dataclasses.replace(presets.tiny_dense(), embed_dim=64, num_layers=1, mlp_dim=192)
    return Config(
        model=student,
        data=DataConfig(seed=0),
        train=TrainConfig(steps=200, batch_size=16, seq_len=128, learning_rate=3e-3,
                          warmup_steps=20),
        distill=DistillConfig(teacher="runs/tiny_dense", kind="forward", alpha=1.0,
                              temperature=1.0),
        workdir="runs/tiny_distill",
    )
