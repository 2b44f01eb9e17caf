"""The tiny dense decoder on the offline reasoning corpus: a CPU smoke run of ~1 minute.

    jaxllm pretrain experiments/tiny_dense.py train.steps=50 workdir=runs/a
"""

from jaxllm import Config, DataConfig, TrainConfig, presets


def config() -> Config:
    return Config(
        model=presets.tiny_dense(),
        data=DataConfig(seed=0),
        train=TrainConfig(steps=200, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20),
        workdir="runs/tiny_dense",
    )
