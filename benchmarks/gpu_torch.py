"""The PyTorch sections of `benchmarks/gpu.py`: the dense Llama as transformers'
LlamaForCausalLM with float32 master weights, bf16 autocast, SDPA attention, AdamW with
jaxllm's settings (fused on GPU) and gradient clipping at 1.0, eager or torch.compile'd."""

import collections
import functools
import time
from collections.abc import Callable, Iterator

import torch
import transformers
from gpu_models import llama
from kernel_profile import summary
from timing import guarded, time_calls
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from jaxllm.config import TrainConfig
from jaxllm.convert.hf_config import to_hf
from jaxllm.train import flops


def hf_llama(tiny: bool, device: str) -> transformers.LlamaForCausalLM:
    """The dense Llama of `gpu_models.llama` through jaxllm's own HF config mapping, in
    float32 on `device`."""
    config = transformers.LlamaConfig.from_dict(to_hf(llama(tiny), "llama"),
                                                attn_implementation="sdpa")
    with torch.device(device):
        return transformers.LlamaForCausalLM(config)


def adamw(model: torch.nn.Module, fused: bool) -> torch.optim.AdamW:
    """AdamW with `TrainConfig`'s defaults at a constant learning rate; the norm weights take
    no weight decay, as in jaxllm's `optimizer.decay_mask`."""
    cfg = TrainConfig()
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                             fused=fused)


def train_step(model: torch.nn.Module, forward, optimizer, tokens: torch.Tensor):
    """One step: the bf16-autocast loss of `forward`, backward, clipping, the update; it
    returns the loss, waiting for the step to finish."""
    clip = TrainConfig().grad_clip

    def step() -> float:
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
            loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def top_kernels(step: Callable[[], float], cuda: bool, *, calls: int = 2, top: int = 12) -> dict:
    """`kernel_profile.top_kernels`'s summary of `calls` steps from torch.profiler: the GPU's
    kernels by their device time, or on a CPU the ops by their own CPU time."""
    activity, device = ((ProfilerActivity.CUDA, DeviceType.CUDA) if cuda
                        else (ProfilerActivity.CPU, DeviceType.CPU))
    with torch.profiler.profile(activities=[activity]) as trace:
        for _ in range(calls):
            step()
    nanoseconds, launches = collections.Counter(), collections.Counter()
    for event in trace.key_averages():
        if event.device_type == device:
            micro = event.self_device_time_total if cuda else event.self_cpu_time_total
            nanoseconds[event.key] += round(micro * 1e3)
            launches[event.key] += event.count
    return summary(nanoseconds, launches, calls=calls, top=top)


def llama_step(args, compiled: bool) -> Iterator[tuple[str, object]]:
    """Parameters, first-step seconds (torch.compile's compile included), tokens/s over the
    timed steps and the top kernels of two more. On a CPU torch.compile stops at
    AOTAutograd (backend "aot_eager"): the graph capture the GPU run shares, without
    inductor's CPU code generation, which is not the GPU's and takes a minute even at toy
    size."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    run = args.run
    yield "device_kind", torch.cuda.get_device_name() if cuda else "cpu"
    model = hf_llama(args.tiny, device)
    yield "attn_implementation", model.config._attn_implementation
    params = sum(p.numel() for p in model.parameters())
    yield "params", params
    yield "per_token_flops", flops.train_flops_per_token(llama(args.tiny), params, run.seq_len)
    forward = model
    if compiled:
        forward = torch.compile(model, backend="inductor" if cuda else "aot_eager")
    tokens = torch.randint(0, model.config.vocab_size, (run.batch, run.seq_len), device=device)
    step = train_step(model, forward, adamw(model, fused=cuda), tokens)
    start = time.perf_counter()
    step()
    yield "first_step_s", time.perf_counter() - start
    timing = time_calls(step, run.steps, warmup=run.warmup)
    yield "step_s", timing.median
    yield "tokens_per_s", run.batch * run.seq_len / timing.median
    yield "loss", timing.out
    yield "top_kernels", guarded(top_kernels, step, cuda)
    if cuda:
        yield "peak_memory_bytes", torch.cuda.max_memory_allocated()


SECTIONS = {
    "torch_eager": functools.partial(llama_step, compiled=False),
    "torch_compile": functools.partial(llama_step, compiled=True),
}
