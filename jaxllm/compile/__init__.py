"""Ahead-of-time compilation for Cloud TPU slices from any machine: `jaxllm compile`."""

from jaxllm.compile.aot import Cost, Memory, Report, compile_for, format_report
from jaxllm.compile.topology import NotFitting, Topology, TopologyError, parse

__all__ = ["Cost", "Memory", "NotFitting", "Report", "Topology", "TopologyError", "compile_for",
           "format_report", "parse"]
