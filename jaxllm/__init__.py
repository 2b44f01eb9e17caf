"""jaxllm: a JAX/Flax training stack for modern decoder-only LLMs."""

from jaxllm.config import (
    Config,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    TrainConfig,
)

__all__ = [
    "Config", "ConfigError", "DataConfig", "MeshConfig", "ModelConfig", "MoEConfig", "TrainConfig",
]
