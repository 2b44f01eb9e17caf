"""Tools a model calls inside its thinking (`<tool>NAME: ARGS</tool>`), and the strict
arithmetic parser they and the verifiers share. Pure Python: no JAX."""

from jaxllm.tools.builtin import BUILTINS, calc, countdown, toolbox
from jaxllm.tools.toolbox import Tool, Toolbox, parse_call

__all__ = ["BUILTINS", "Tool", "Toolbox", "calc", "countdown", "parse_call", "toolbox"]
