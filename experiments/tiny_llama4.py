"""The tiny Llama-4-style MoE (dense and MoE layers alternating, sigmoid top-1 plus a shared
expert; three chunked RoPE layers, then a global NoPE layer) on the offline reasoning corpus.

    jaxllm pretrain experiments/tiny_llama4.py train.steps=50 workdir=runs/a
"""

from jaxllm import Config, DataConfig, TrainConfig, presets


def config() -> Config:
    return Config(
        model=presets.tiny_llama4(),
        data=DataConfig(seed=0),
        train=TrainConfig(steps=200, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20),
        workdir="runs/tiny_llama4",
    )
