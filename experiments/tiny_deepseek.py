"""The tiny DeepSeek-V3-style MoE (MLA with YaRN, first layer dense, fine-grained and shared
experts, sigmoid group-limited routing, aux-loss-free bias balancing) on the offline reasoning
corpus.

    jaxllm pretrain experiments/tiny_deepseek.py train.steps=50 workdir=runs/a
"""

from jaxllm import Config, DataConfig, TrainConfig, presets


def config() -> Config:
    return Config(
        model=presets.tiny_deepseek(),
        data=DataConfig(seed=0),
        train=TrainConfig(steps=200, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20),
        workdir="runs/tiny_deepseek",
    )
