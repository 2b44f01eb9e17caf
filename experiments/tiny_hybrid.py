"""The tiny hybrid model (three Mamba-2 layers, then one attention layer) on the offline
reasoning corpus, with tiny_dense's training settings:

    jaxllm pretrain experiments/tiny_hybrid.py train.steps=50 workdir=runs/b
"""

from jaxllm import Config, DataConfig, TrainConfig, presets


def config() -> Config:
    return Config(
        model=presets.tiny_hybrid(),
        data=DataConfig(seed=0),
        train=TrainConfig(steps=200, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20),
        workdir="runs/tiny_hybrid",
    )
