"""Model presets. Experiment files compose these with mesh, data and training settings."""

from jaxllm.config import ModelConfig


def tiny_dense() -> ModelConfig:
    """A 2-layer GQA decoder that learns the arithmetic corpus on a laptop CPU in a minute."""
    return ModelConfig(
        vocab_size=384,
        embed_dim=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=384,
    )


def small_dense() -> ModelConfig:
    """About 46M parameters (4 layers, d=512, vocab 32k): the CPU benchmark model."""
    return ModelConfig(
        vocab_size=32_000,
        embed_dim=512,
        num_layers=4,
        num_heads=8,
        num_kv_heads=8,
        mlp_dim=1536,
    )


PRESETS = {"tiny_dense": tiny_dense, "small_dense": small_dense}
