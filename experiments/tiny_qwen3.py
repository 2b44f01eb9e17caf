"""The tiny Qwen3-MoE-style model (softmax top-4 of 16 experts, per-head q/k RMSNorm) on the
offline reasoning corpus.

    jaxllm pretrain experiments/tiny_qwen3.py train.steps=50 workdir=runs/a
"""

from jaxllm import Config, DataConfig, TrainConfig, presets


def config() -> Config:
    return Config(
        model=presets.tiny_qwen3(),
        data=DataConfig(seed=0),
        train=TrainConfig(steps=200, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20),
        workdir="runs/tiny_qwen3",
    )
