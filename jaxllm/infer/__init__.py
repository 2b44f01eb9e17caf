"""Inference: a KV-cache sampler, reasoning-effort control, self-consistency voting, and
generation with tool calls."""

from jaxllm.infer.cache import decode_step, init_cache, left_pad, prefill
from jaxllm.infer.effort import EFFORTS, Effort, ThinkTokens
from jaxllm.infer.sampler import GenerationResult, Sampler, generate
from jaxllm.infer.sampling import SamplingConfig, filter_logits, sample
from jaxllm.infer.tool_use import ToolResult, ToolSampler, generate_with_tools
from jaxllm.infer.voting import Vote, extract_answer, majority_vote, self_consistency

__all__ = [
    "EFFORTS",
    "Effort",
    "GenerationResult",
    "Sampler",
    "SamplingConfig",
    "ThinkTokens",
    "ToolResult",
    "ToolSampler",
    "Vote",
    "decode_step",
    "extract_answer",
    "filter_logits",
    "generate",
    "generate_with_tools",
    "init_cache",
    "left_pad",
    "majority_vote",
    "prefill",
    "sample",
    "self_consistency",
]
