"""tiny_dense with local attention: sliding-window ALiBi, strided sparse and global NoPE
layers on the blockwise kernel, on the offline reasoning corpus.

    jaxllm pretrain experiments/tiny_local.py train.steps=50 workdir=runs/a
"""

from jaxllm import Config, DataConfig, TrainConfig, presets


def config() -> Config:
    return Config(
        model=presets.tiny_local(),
        data=DataConfig(seed=0),
        train=TrainConfig(steps=200, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20),
        workdir="runs/tiny_local",
    )
