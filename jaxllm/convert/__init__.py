"""Hugging Face checkpoints in and out: `jaxllm convert hf-import|hf-export`."""

from jaxllm.convert.hf_config import ConversionError
from jaxllm.convert.hf_export import export_hf
from jaxllm.convert.hf_import import import_hf

__all__ = ["ConversionError", "export_hf", "import_hf"]
