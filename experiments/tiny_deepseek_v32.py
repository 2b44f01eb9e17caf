"""The tiny DeepSeek-V3.2-style model (tiny_deepseek plus DeepSeek sparse attention: a
lightning indexer picks each query's top-32 keys and learns from its KL loss) on the offline
reasoning corpus.

    jaxllm pretrain experiments/tiny_deepseek_v32.py train.steps=50 workdir=runs/a
"""

from jaxllm import Config, DataConfig, TrainConfig, presets


def config() -> Config:
    return Config(
        model=presets.tiny_deepseek_v32(),
        data=DataConfig(seed=0),
        train=TrainConfig(steps=200, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20),
        workdir="runs/tiny_deepseek_v32",
    )
