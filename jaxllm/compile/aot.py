"""Ahead-of-time compilation of a run's step for a Cloud TPU slice, on any machine.

The step is the one a run jits (`jaxllm.train.step` for pretraining, `jaxllm.rl.step` for
an experiment with a GRPO config), lowered from shapes alone over a mesh of the slice's
devices (`topology.Topology.devices`) and compiled by the TPU compiler in libtpu. Nothing is
allocated or run: the result is the compiler's per-chip memory and cost analysis.

Scanned layers: XLA's `cost_analysis` counts a loop body once, so a scanned stack of L
layers reports the FLOPs of one layer group. `step_cost` corrects it from two unrolled
compiles of the same step at one and two repeats of the stack's repeating group, whose
difference is exactly one group: cost = cost(1) + (repeats - 1) * (cost(2) - cost(1)).
Those compiles take the whole batch in one micro-batch (the FLOPs of gradient accumulation
are the same, and its loop would be counted once too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import jax
import jax.numpy as jnp

from jaxllm import calculator, fp8_costs, parallel
from jaxllm import config as config_lib
from jaxllm.compile.topology import NotFitting, Topology
from jaxllm.data.image_sources import default_row_patches
from jaxllm.nn.attention_kernels import resolve_kernel
from jaxllm.nn.masks import Mask
from jaxllm.nn.transformer import Transformer, layer_kinds, layer_segments
from jaxllm.rl.step import batch_shardings, jit_grpo_step
from jaxllm.train import flops
from jaxllm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxllm.train.state import abstract_state, count_params
from jaxllm.train.step import jit_train_step

PRETRAIN_BATCH = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
                  "segment_ids": jnp.int32, "loss_mask": jnp.float32}
GRPO_BATCH = {"tokens": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32,
              "completion_mask": jnp.int32, "advantages": jnp.float32,
              "sampler_logprobs": jnp.float32, "old_logprobs": jnp.float32,
              "ref_logprobs": jnp.float32}


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per chip from the compiled step's `memory_analysis()`."""

    arguments: int
    outputs: int
    aliased: int  # outputs that reuse a donated argument's buffer
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per-chip figures from `cost_analysis()`: FLOPs, bytes accessed, and the compiler's
    own time estimate, `optimal_seconds`."""

    flops: float
    bytes_accessed: float
    optimal_seconds: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(a + b for a, b in zip(dataclasses.astuple(self),
                                            dataclasses.astuple(other))))

    def __sub__(self, other: Cost) -> Cost:
        return self + other.scaled(-1)

    def scaled(self, factor: float) -> Cost:
        return Cost(*(factor * a for a in dataclasses.astuple(self)))


def memory_of(compiled) -> Memory:
    m = compiled.memory_analysis()
    return Memory(
        arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
        aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
        code=m.generated_code_size_in_bytes,
    )


def cost_of(compiled) -> Cost:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # one entry per program in older jax
        analysis = analysis[0]
    seconds = float(analysis.get("optimal_seconds", math.nan))
    # Some programs (seen with expert parallelism's all-to-all) get a negative estimate,
    # the compiler's way of having none: nan keeps it out of every sum.
    return Cost(float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)),
                seconds if seconds >= 0 else math.nan)


def phase(config: config_lib.Config) -> str:
    """"grpo" when the experiment sets a GRPO config, else "pretrain"."""
    return "pretrain" if config.grpo is None else "grpo"


def _reads_images(config: config_lib.Config) -> bool:
    """Whether the run's batches carry patches: a vision model on an image source (for GRPO,
    on the image corpus's problems)."""
    sources = ("images",) if config.grpo else config_lib.IMAGE_SOURCES
    return bool(config.model.vision.image_size) and config.data.source in sources


def _batch_specs(config: config_lib.Config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's batch as shapes: train.batch_size sequences of train.seq_len tokens (for
    GRPO, prompt and completion together), and the rows' patches for a run on images."""
    rows, length = config.train.batch_size, config.train.seq_len
    vision, images = config.model.vision, _reads_images(config)
    per_image = vision.grid**2
    if config.grpo is None:
        dtypes = dict(PRETRAIN_BATCH)
        if images and mesh.shape[parallel.CONTEXT] > 1:
            dtypes["patch_index"] = jnp.int32  # added by the loop's context ordering
        shapes = {k: (rows, length) for k in dtypes}
        shapes["patches"] = (rows, default_row_patches(length, per_image), vision.patch_dim)
        shardings = parallel.batch_shardings(mesh, [*dtypes] + ["patches"] * images)
    else:  # a GRPO row is one prompt with at most one image
        dtypes = GRPO_BATCH
        shapes = {k: (rows, length) for k in GRPO_BATCH}
        shapes |= {"advantages": (rows,), "patches": (rows, per_image, vision.patch_dim)}
        shardings = batch_shardings(mesh, config.grpo, images=images)
    dtypes = {**dtypes, "patches": jnp.float32}
    return {k: jax.ShapeDtypeStruct(shapes[k], dtypes[k], sharding=s)
            for k, s in shardings.items()}


@contextlib.contextmanager
def no_compilation_cache():
    """Keeps TPU executables out of a persistent compilation cache set up for the local
    backend: they cannot be loaded back without a TPU client. JAX decides once per process
    whether it uses the cache, so the compile-time threshold for writing is raised too."""
    enabled = jax.config.jax_enable_compilation_cache
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)


def compile_step(config: config_lib.Config, mesh):
    """`lower_step` compiled by the mesh's compiler."""
    with no_compilation_cache():
        return lower_step(config, mesh).compile()


def lower_step(config: config_lib.Config, mesh) -> jax.stages.Lowered:
    """The run's jitted step, lowered for `mesh` from shapes; nothing is allocated."""
    model = Transformer(config.model)
    tx, schedule = make_optimizer(config.train), learning_rate_schedule(config.train)
    state = abstract_state(model, tx, config.train.seq_len, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    batch = _batch_specs(config, mesh)
    with parallel.use_mesh(mesh):
        if config.grpo is None:
            step = jit_train_step(model, tx, config.train, schedule, mesh, shardings,
                                  batch_shardings={k: x.sharding for k, x in batch.items()})
        else:
            step = jit_grpo_step(model, tx, config.grpo, schedule, mesh, shardings,
                                 images=_reads_images(config))
        return step.lower(state, batch)


def _unrolled(config: config_lib.Config, repeats: int) -> config_lib.Config:
    """`config` with `repeats` of the stack's last repeating group, unrolled, and the whole
    batch in one micro-batch."""
    model = config.model
    first = model.moe.first_dense_layers if model.moe else 0
    _, group, _ = layer_segments(model)[-1]
    model = dataclasses.replace(model, num_layers=first + repeats * len(group), scan_layers=False)
    train = dataclasses.replace(config.train, grad_accum=1)
    return dataclasses.replace(config, model=model, train=train)


def step_cost(config: config_lib.Config, mesh, compiled=None) -> tuple[Cost | None, str]:
    """(the step's per-chip cost with every layer and micro-batch counted, how it was got);
    (None, why) when an unrolled compile, which takes the whole batch in one micro-batch,
    runs out of memory.

    `compiled`, the step of `config` itself if at hand, is exact when nothing loops."""
    segments = layer_segments(config.model)
    repeats = segments[-1][2]
    looped = config.model.scan_layers and (repeats > 1 or len(segments) > 1)
    if not looped and config.train.grad_accum == 1:
        compiled = compiled or compile_step(config, mesh)
        return cost_of(compiled), "exact: no loop in the step"
    try:
        one = cost_of(compile_step(_unrolled(config, 1), mesh))
        if repeats == 1:
            return one, "from an unrolled compile"
        two = cost_of(compile_step(_unrolled(config, 2), mesh))
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return None, ("none: the unrolled cost compile, the whole batch in one micro-batch, "
                      "ran out of memory")
    return one + (two - one).scaled(repeats - 1), (
        f"corrected for the scan: unrolled compiles of 1 and 2 repeating groups, the "
        f"difference times {repeats - 1} more")


def splash_cost(config: config_lib.Config, devices: int, peak_flops_per_device: float) -> Cost:
    """An estimate of the step's splash attention work per device, which `cost_analysis`
    leaves out: the Pallas kernel carries no cost estimate, so XLA counts it as nothing.

    Per token and splash layer, the forward takes 2 H S_v (d_qk + d_v) FLOPs, S_v the keys a
    query sees on average (S/2 causal, the window, chunk/2); the backward 2.5 times that
    (FlashAttention's five matmuls to the forward's two); remat adds the forward again. The
    time is those FLOPs at the device's peak.
    """
    m, t = config.model, config.train
    a = m.attention
    heads = m.num_heads
    qk_dim = v_dim = m.resolved_head_dim
    if a.mla is not None:
        qk_dim, v_dim = a.mla.qk_nope_head_dim + a.mla.qk_rope_head_dim, a.mla.v_head_dim
    passes = 3.5 + (m.remat != "none")
    flops = 0.0
    for kind in layer_kinds(m):
        mask = Mask(kind.attention, a.window, a.chunk, a.stride)
        if resolve_kernel(a.kernel, mask, alibi=kind.position == "alibi",
                          platform="tpu") != "splash":
            continue
        seen = {"sliding": min(a.window, t.seq_len), "chunked": min(a.chunk, t.seq_len) / 2}
        flops += passes * 2 * heads * seen.get(kind.attention, t.seq_len / 2) * (qk_dim + v_dim)
    flops *= t.batch_size * t.seq_len / devices
    return Cost(flops, 0.0, flops / peak_flops_per_device)


@dataclasses.dataclass(frozen=True)
class Report:
    """What `compile_for` found for one config on one topology. Times are estimates."""

    topology: str
    libtpu_topology: str
    chips: int
    devices: int
    phase: str
    mesh: dict[str, int]
    hbm_bytes: int  # per device
    memory: Memory
    compiled_cost: Cost  # of the step as compiled: a loop body counted once
    cost: Cost | None  # every layer counted; None when only memory was asked for
    cost_method: str
    tokens_per_step: int
    model_flops_per_step: float
    peak_flops_per_chip: float
    compile_seconds: float
    fp8: fp8_costs.Fp8Estimate | None = None  # model.fp8's effect (estimate); None without

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.hbm_bytes

    @property
    def margin_bytes(self) -> int:
        return self.hbm_bytes - self.memory.total

    @property
    def step_seconds(self) -> float | None:
        """The compiler's estimate of the step time (`optimal_seconds`): an estimate."""
        seconds = self.cost.optimal_seconds if self.cost else math.nan
        return seconds if math.isfinite(seconds) and seconds > 0 else None

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens_per_step / self.step_seconds if self.step_seconds else None

    @property
    def mfu_bound(self) -> float | None:
        """Model FLOPs per second at the estimated step time over the slice's peak."""
        if not self.step_seconds:
            return None
        return self.model_flops_per_step / self.step_seconds / (
            self.chips * self.peak_flops_per_chip)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["memory"]["total"] = self.memory.total
        for name in ("fits", "margin_bytes", "step_seconds", "tokens_per_second", "mfu_bound"):
            out[name] = getattr(self, name)
        for cost in ("compiled_cost", "cost"):  # JSON has no nan: no estimate is null
            if out[cost] and not math.isfinite(out[cost]["optimal_seconds"]):
                out[cost]["optimal_seconds"] = None
        return out


def prepare(config: config_lib.Config, topology: Topology):
    """(the validated config with the slice count of `topology`, the mesh over its devices).

    Raises ConfigError when the config is invalid or its mesh does not tile the slice.
    """
    if config.mesh.slices not in (1, topology.slices):
        raise config_lib.ConfigError(
            f"mesh.slices: {config.mesh.slices} slices, but --slices is {topology.slices}")
    config = config_lib.validate(dataclasses.replace(
        config, mesh=dataclasses.replace(config.mesh, slices=topology.slices)))
    return config, parallel.make_mesh(config, topology.devices())


def compile_for(config: config_lib.Config, topology: Topology, *, cost: bool = True) -> Report:
    """Compiles the step of `config` for `topology` and reads the compiler's analyses; with
    `cost`, also the step's cost with every layer counted (`step_cost`)."""
    config, mesh = prepare(config, topology)
    start = time.perf_counter()
    try:
        compiled = compile_step(config, mesh)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        raise NotFitting(f"the step does not fit {topology.name}: "
                         f"{str(error).splitlines()[0]}") from None
    seconds = time.perf_counter() - start
    total_cost, method = step_cost(config, mesh, compiled) if cost else (None, "not computed")
    if total_cost is not None:
        total_cost, method = _with_splash(total_cost, method, config, topology, mesh.size)
    tokens = config.train.batch_size * config.train.seq_len
    num_params = count_params(jax.eval_shape(
        Transformer(config.model).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
    )["params"])
    return Report(
        topology=topology.name + (f" x{topology.slices}" if topology.slices > 1 else ""),
        libtpu_topology=topology.libtpu_name, chips=topology.chips, devices=mesh.size,
        phase=phase(config), mesh=dict(mesh.shape), hbm_bytes=topology.hbm_per_device(
            list(mesh.devices.flat)),
        memory=memory_of(compiled), compiled_cost=cost_of(compiled), cost=total_cost,
        cost_method=method,
        tokens_per_step=tokens,
        model_flops_per_step=tokens * flops.train_flops_per_token(
            config.model, num_params, config.train.seq_len),
        peak_flops_per_chip=topology.generation.peak_flops, compile_seconds=seconds,
        fp8=fp8_costs.estimate(config.model, *calculator.param_counts(config.model),
                               flops.train_flops_per_token(config.model, num_params,
                                                           config.train.seq_len)),
    )


def with_cost(report: Report, config: config_lib.Config, topology: Topology) -> Report:
    """`report` of `config` (compiled with cost=False) with its step cost added."""
    config, mesh = prepare(config, topology)
    total_cost, method = step_cost(config, mesh)
    if total_cost is not None:
        total_cost, method = _with_splash(total_cost, method, config, topology, mesh.size)
    return dataclasses.replace(report, cost=total_cost, cost_method=method)


def _with_splash(total: Cost, method: str, config, topology: Topology, devices: int):
    """`total` plus the splash attention estimate, and the method saying so."""
    peak = topology.generation.peak_flops * topology.chips / devices
    splash = splash_cost(config, devices, peak)
    if not splash.flops:
        return total, method
    return total + splash, method + "; plus splash attention at the chip's peak (uncounted by XLA)"


def gib(value: float) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{value / 2**30:.1f} GiB" if abs(value) >= 2**30 else f"{value / 2**20:.1f} MiB"


def format_report(report: Report) -> str:
    """The report as the lines `jaxllm compile` prints."""
    m = report.memory
    mesh = " ".join(f"{k}={v}" for k, v in report.mesh.items() if v > 1) or "one device"
    share = report.margin_bytes / report.hbm_bytes
    lines = [
        f"topology     {report.topology}: {report.chips} chips (libtpu {report.libtpu_topology}), "
        f"{report.devices} devices",
        f"step         {report.phase}, {report.tokens_per_step:,} tokens, mesh {mesh}, "
        f"compiled in {report.compile_seconds:.0f} s",
        f"per device   arguments {gib(m.arguments)}, outputs {gib(m.outputs)} "
        f"({gib(m.aliased)} donated), temporaries {gib(m.temporaries)}, code {gib(m.code)}",
        f"             total {gib(m.total)} of {gib(report.hbm_bytes)} HBM",
        f"fits         {'yes' if report.fits else 'NO'}: "
        f"{gib(abs(report.margin_bytes))} {'to spare' if report.fits else 'over'} "
        f"({abs(share):.0%} of HBM)",
    ]
    if report.cost is not None:
        c = report.cost
        lines.append(f"cost         {c.flops:.3g} FLOPs and {c.bytes_accessed:.3g} bytes per "
                     f"device per step ({report.cost_method})")
    elif report.cost_method != "not computed":
        lines.append(f"cost         {report.cost_method}")
    if report.fp8 is not None:
        lines.append(f"fp8          {fp8_costs.describe(report.fp8)}; the memory above is the "
                     "compiled fp8 step's (quantised residuals included)")
    if report.cost is not None and not report.step_seconds:
        lines.append("estimate     none: the compiler gave no time estimate for this step")
    if report.step_seconds:
        lines.append(
            f"estimate     step {report.step_seconds:.3g} s, {report.tokens_per_second:,.0f} "
            f"tokens/s, MFU bound {report.mfu_bound:.1%}: the compiler's optimal_seconds, an "
            f"estimate, not a measurement")
    return "\n".join(lines)

