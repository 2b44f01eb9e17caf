"""A tiny decoder trained on 32k-token sequences, each split over 8 devices by ring attention.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        jaxllm pretrain experiments/long_context_ring.py

Every sequence is one packed row of short arithmetic documents; the data path permutes it into
the zigzag order, and each of the 8 devices on the `context` axis holds 4096 of its tokens.
"""

from jaxllm import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=384, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
            head_dim=16, mlp_dim=96,
        ),
        mesh=MeshConfig(data=1, context=8, context_order="zigzag"),
        data=DataConfig(source="arithmetic"),
        train=TrainConfig(
            steps=4, batch_size=1, seq_len=32_768, learning_rate=3e-3, warmup_steps=1,
            log_every=1, eval_every=0,
        ),
        workdir="runs/long_context_ring",
    )
