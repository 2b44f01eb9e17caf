"""jaxllm: a JAX/Flax training stack for modern decoder-only LLMs."""

from jaxllm._platforms import skip_tpu_probe_without_tpu

skip_tpu_probe_without_tpu()


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
