"""A 1.24B dense decoder on one v5e-8 host (8 chips, 16 GiB HBM each), pure FSDP.

Llama-3.2-1B's dimensions (d 2048, 16 layers, 32/8 heads, FFN 8192, tied 128256-token
embedding, RoPE theta 500000) without its long-context RoPE scaling, on C4 with the
Llama 3 tokenizer (`tokenizers/llama3/tokenizer.json` in the checkout, see
tpu_setup/README.md). `jaxllm params experiments/tpu_v5e_8.py --devices 8` prints the
memory per chip: about 8 GiB of the 16.

    tpu_setup/launch.sh --bucket gs://B --experiment experiments/tpu_v5e_8.py --run v5e8
"""

from jaxllm import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig
from jaxllm.config import CheckpointConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=128_256,
            embed_dim=2048,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            mlp_dim=8192,
            rope_theta=500_000.0,
            norm_eps=1e-5,
            tie_embeddings=True,
            dtype="bfloat16",
            remat="full",
        ),
        mesh=MeshConfig(data=1, fsdp=8),
        data=DataConfig(source="tfds", name="c4/en:3.1.0", eval_split="validation",
                        tokenizer="tokenizers/llama3/tokenizer.json"),
        train=TrainConfig(steps=20_000, batch_size=16, seq_len=2048, learning_rate=3e-4,
                          warmup_steps=1000, log_every=50, eval_every=1000),
        checkpoint=CheckpointConfig(every=1000),
    )
