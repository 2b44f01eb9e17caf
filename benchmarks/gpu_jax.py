"""The JAX sections of `benchmarks/gpu.py`: the matmul peak, jaxllm's train step of the dense
Llama, the MoE models against dense models of their active parameters, and one attention
call per kernel. Each section yields (key, result) pairs as it measures them."""

import dataclasses
import functools
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from attention import fwd_bwd, masked
from gpu_models import MOE_SHAPES, llama, moe_model
from kernel_profile import top_kernels
from moe import active_params, dense_active
from timing import guarded, time_calls
from train_step import build, compile_step

from jaxllm import calculator
from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.nn import attention_kernels, experts
from jaxllm.nn.masks import Mask
from jaxllm.train import flops
from jaxllm.train.state import count_params

# The dropless grouped-matmul kernels that run on GPU: auto stands for one of them, gmm is
# the Pallas TPU kernel, and sorted_einsum is dropless only with E/k times the FLOPs.
MOE_KERNELS = tuple(k for k in experts.KERNELS if k not in ("auto", "gmm", "sorted_einsum"))
# Attention kernels not timed: auto stands for one of the others, splash is TPU-only.
SKIPPED_ATTENTION = ("auto", "splash")


def spec_peak(kind: str) -> float | None:
    """The dense bf16 spec-sheet FLOP/s of a device kind (`flops.KNOWN_PEAK_FLOPS`), or None."""
    return next((peak for name, peak in flops.KNOWN_PEAK_FLOPS.items()
                 if kind.startswith(name)), None)


def matmul(args) -> Iterator[tuple[str, object]]:
    """The device, its spec peak, and the best bf16 FLOP/s of an n x n x n matmul."""
    first = jax.devices()[0]
    yield "platform", first.platform
    yield "device_kind", first.device_kind
    yield "spec_peak", spec_peak(first.device_kind)
    size = args.run.matmul_size
    yield "size", size
    yield "measured_peak", flops.measure_matmul_peak(size, jnp.bfloat16, repeats=20)


def train_throughput(model: config_lib.ModelConfig, run, steps: int, profile: bool = False
                     ) -> dict:
    """Parameters, compile seconds, median step seconds, tokens/s, last loss and XLA memory of
    jaxllm's train step (built as `train.loop` builds it) on one device; with `profile`, the
    top kernels of two more steps (`kernel_profile.top_kernels`)."""
    train = config_lib.TrainConfig(steps=1000, batch_size=run.batch, seq_len=run.seq_len,
                                   warmup_steps=10)
    mesh, state, batch, step = build(config_lib.Config(model=model, train=train))
    params = count_params(state.params)
    compiled, compile_s = compile_step(mesh, state, batch, step)
    memory = compiled.memory_analysis()

    def train_step():
        nonlocal state
        state, metrics = compiled(state, batch)
        return metrics

    with parallel.use_mesh(mesh):
        timing = time_calls(train_step, steps, warmup=run.warmup)
        loss = float(timing.out["loss"])
        kernels = {"top_kernels": guarded(top_kernels, train_step)} if profile else {}
    return dict(params=params, compile_s=compile_s, step_s=timing.median,
                tokens_per_s=run.batch * run.seq_len / timing.median, loss=loss,
                temp_bytes=memory.temp_size_in_bytes,
                argument_bytes=memory.argument_size_in_bytes, **kernels)


def dense(args) -> Iterator[tuple[str, object]]:
    """The dense Llama in bf16 (float32 params, AdamW, clip 1.0): tokens/s and the model FLOPs
    per token of `flops.train_flops_per_token` (6N + attention), for MFU. Where the model
    fails with `--attention`'s kernel, the error is recorded and it runs with auto's."""
    base = llama(args.tiny)
    yield "remat", args.remat
    for kernel in dict.fromkeys((args.attention, "auto")):
        attention = dataclasses.replace(base.attention, kernel=kernel)
        model = dataclasses.replace(base, dtype="bfloat16", remat=args.remat, attention=attention)
        r = guarded(train_throughput, model, args.run, args.run.steps, True)
        if "error" not in r:
            break
        yield f"error_with_{kernel}", r["error"]
    yield "attention_kernel", attention_kernels.resolve_kernel(kernel, Mask())
    yield from r.items()
    if "params" in r:
        yield "per_token_flops", flops.train_flops_per_token(model, r["params"],
                                                             args.run.seq_len)


def moe_kernels(auto: str) -> list[str]:
    """The dropless kernels in the order they are timed: the one auto stands for first, then
    the others, ragged_dot (computed densely per group by XLA:GPU) last, so that a section
    that runs out of time loses the least telling figures."""
    others = [k for k in MOE_KERNELS if k not in (auto, "ragged_dot")]
    return [auto, *others, "ragged_dot"]


def moe(section: str, args) -> Iterator[tuple[str, object]]:
    """The dense model of the MoE model's active parameters, then the MoE model with each
    dropless kernel: tokens/s of the train step. `auto` names the kernel it stands for here,
    whose model's top kernels are traced too."""
    model = moe_model(section, args.tiny)
    auto = experts.resolve_kernel("auto")
    yield "auto", auto
    total = sum(calculator.param_counts(model)[0].values())
    dense_model = dense_active(model, active_params(model, total), total)
    yield "dense_active", guarded(train_throughput, dense_model, args.run, args.run.moe_steps)
    for kernel in moe_kernels(auto):
        variant = dataclasses.replace(model, moe=dataclasses.replace(model.moe, kernel=kernel))
        r = guarded(train_throughput, variant, args.run, args.run.moe_steps, kernel == auto)
        if "params" in r:
            r["active_params"] = active_params(model, r["params"])
        yield kernel, r


def attention_call(kernel: str, q, k, v, reference) -> dict:
    """Compile seconds and median seconds of one fwd+bwd attention call with `kernel`, and its
    gradients' largest error relative to `reference`'s largest magnitude."""
    start = time.perf_counter()
    compiled = fwd_bwd(masked(Mask(), kernel, block=128)).lower(q, k, v).compile()
    compile_s = time.perf_counter() - start
    seconds = time_calls(functools.partial(compiled, q, k, v), repeats=10).median
    error = max(float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
                for got, want in zip(compiled(q, k, v), reference))
    return dict(compile_s=compile_s, seconds=seconds, relative_error=error)


def attention(args) -> Iterator[tuple[str, object]]:
    """Fwd+bwd of one causal self-attention call at the dense Llama's head shape, bf16, for
    every kernel of `attention_kernels.KERNELS` but auto and splash, each checked against
    the naive kernel in float32 on the same inputs. FLOPs by the PaLM count of
    `flops.train_flops_per_token`'s attention term: 12 B H D S^2."""
    model, run = llama(args.tiny), args.run
    keys = jax.random.split(jax.random.key(0), 3)
    heads = (model.num_heads, model.num_kv_heads, model.num_kv_heads)
    q, k, v = (jax.random.normal(key, (run.batch, run.seq_len, h, model.resolved_head_dim),
                                 jnp.bfloat16) for key, h in zip(keys, heads))
    yield "flops", 12 * run.batch * model.num_heads * model.resolved_head_dim * run.seq_len**2
    reference = jax.jit(fwd_bwd(masked(Mask(), "naive", block=128)))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for kernel in attention_kernels.KERNELS:
        if kernel not in SKIPPED_ATTENTION:
            yield kernel, guarded(attention_call, kernel, q, k, v, reference)


SECTIONS = {
    "matmul": matmul,
    "jaxllm": dense,
    "attention": attention,
    **{name: functools.partial(moe, name) for name in MOE_SHAPES},
}
