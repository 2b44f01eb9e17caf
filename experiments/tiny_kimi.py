"""The tiny Kimi-K2-style MoE (DeepSeek-V3's design with more experts, fewer heads and no
group limit) on the offline reasoning corpus.

    jaxllm pretrain experiments/tiny_kimi.py train.steps=50 workdir=runs/a
"""

from jaxllm import Config, DataConfig, TrainConfig, presets


def config() -> Config:
    return Config(
        model=presets.tiny_kimi(),
        data=DataConfig(seed=0),
        train=TrainConfig(steps=200, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20),
        workdir="runs/tiny_kimi",
    )
