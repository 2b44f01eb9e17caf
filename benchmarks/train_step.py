"""Train-step benchmark: matmul peak, MFU of the small_dense step, compile time vs depth.

    python benchmarks/train_step.py                               # full run
    python benchmarks/train_step.py --steps 2 --skip-compile-check  # smoke run
    python benchmarks/train_step.py --fp8 blockwise --only-fp8       # fp8 against none

1. The host's large-matmul peak (float32 and bfloat16, n x n x n) from
   `jaxllm.train.flops.measure_matmul_peak`.
2. The small_dense train step (46M params) built as `jaxllm.train.loop` builds it, on a
   one-device mesh: median step time, tokens/s, MFU against the measured peak of the
   compute dtype, XLA's cost and memory analysis of the compiled step.
3. Trace + compile time of the step for a shallow and a deep model: with
   `scan_layers=True` the ratio should stay near 1; unrolled layers for contrast.
4. With --fp8: the same step with `model.fp8` set against the same step without, timed
   alternately in one run, and both steps' compiled memory. Without fp8 hardware (a CPU)
   the fp8 matmuls are emulated, so this measures their overhead, not a speed-up.

Other processes on the same cores skew every number: the 1-minute load average before
the run is printed so that a noisy run can be spotted and rerun.
"""

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp

import flax_reference
from timing import command, cost_flops, load, machine, table, time_calls, time_interleaved

from jaxllm import config as config_lib
from jaxllm import parallel, presets
from jaxllm.data import make_source
from jaxllm.nn import Transformer
from jaxllm.train import flops
from jaxllm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxllm.train.state import count_params, init_state
from jaxllm.train.step import jit_train_step


def build(config: config_lib.Config):
    """Mesh, state, one batch and the jitted step, exactly as `train.loop.pretrain` does."""
    # Token ids only matter for the loss value: the in-memory arithmetic source needs no TFDS.
    config = config_lib.validate(
        dataclasses.replace(config, data=config_lib.DataConfig(source="arithmetic"))
    )
    cfg = config.train
    mesh = parallel.make_mesh(config, jax.devices()[:1])
    model = Transformer(config.model)
    tx = make_optimizer(cfg)
    state, state_shardings = init_state(model, tx, cfg.seq_len, mesh, jax.random.key(cfg.seed))
    batch = next(make_source(config).batches(cfg.batch_size, cfg.seq_len))
    batch = jax.device_put(batch, parallel.batch_sharding(mesh))
    step = jit_train_step(model, tx, cfg, learning_rate_schedule(cfg), mesh, state_shardings)
    return mesh, state, batch, step


def compile_step(mesh, state, batch, step):
    """(compiled step, seconds to trace, lower and compile it)."""
    with parallel.use_mesh(mesh):
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
    return compiled, time.perf_counter() - start


def bench_step(args, peaks) -> dict:
    model = dataclasses.replace(presets.small_dense(), dtype=args.dtype, remat=args.remat)
    config = config_lib.Config(
        model=model,
        train=config_lib.TrainConfig(
            steps=1000, batch_size=args.batch, seq_len=args.seq_len, warmup_steps=10
        ),
    )
    mesh, state, batch, step = build(config)
    num_params = count_params(state.params)
    per_token = flops.train_flops_per_token(model, num_params, args.seq_len)
    tokens = args.batch * args.seq_len
    compiled, compile_s = compile_step(mesh, state, batch, step)

    def train_step():
        nonlocal state
        state, metrics = compiled(state, batch)
        return state, metrics

    with parallel.use_mesh(mesh):
        timing = time_calls(train_step, args.steps, warmup=args.warmup)
    times, metrics, cores_used = timing.times, timing.out[1], timing.cores
    step_s = timing.median
    memory = compiled.memory_analysis()
    xla = cost_flops(compiled)
    # XLA counts a while loop's body once, so also cost the same step with unrolled layers
    # (lowered only, not compiled).
    unrolled = dataclasses.replace(config, model=dataclasses.replace(model, scan_layers=False))
    mesh_u, state_u, batch_u, step_u = build(unrolled)
    with parallel.use_mesh(mesh_u):
        xla_unrolled = cost_flops(step_u.lower(state_u, batch_u))
    del state_u
    r = dict(
        params=num_params, per_token=per_token, compile_s=compile_s, step_s=step_s,
        min_s=min(times), max_s=max(times), tokens_per_s=tokens / step_s,
        model_flops=per_token * tokens, xla_flops=xla, xla_unrolled=xla_unrolled,
        loss=float(metrics["loss"]), cores_used=cores_used,
        temp=memory.temp_size_in_bytes, arg=memory.argument_size_in_bytes,
    )
    r["mfu"] = r["tokens_per_s"] * per_token / peaks[args.dtype]
    print(f"\n== train step: small_dense, batch {args.batch} x seq {args.seq_len}, "
          f"{args.dtype}, remat={args.remat}, scan_layers={model.scan_layers}")
    print(f"params {num_params:,}; model FLOPs/token {per_token / 1e6:.1f} M "
          f"(x {tokens} tokens = {r['model_flops'] / 1e9:.1f} GFLOP/step)")
    print(f"compile {compile_s:.1f} s; loss after {args.warmup + args.steps} steps "
          f"{r['loss']:.3f}")
    print(f"step time median {step_s * 1e3:.0f} ms (min {r['min_s'] * 1e3:.0f}, "
          f"max {r['max_s'] * 1e3:.0f}, {args.steps} steps)")
    print(f"tokens/s {r['tokens_per_s']:,.0f}; achieved "
          f"{r['tokens_per_s'] * per_token / 1e9:.1f} GFLOP/s; "
          f"MFU {r['mfu']:.1%} of the measured {args.dtype} peak")
    print(f"CPU time / wall time while timing: {cores_used:.2f} of {os.cpu_count()} cores"
          + (" -- WARNING: other processes took CPU, rerun on an idle machine"
             if cores_used < 0.75 * os.cpu_count() else ""))
    print(f"XLA cost_analysis: compiled step {xla / 1e9:.1f} GFLOP (the scanned layer body "
          f"counted once); unrolled layers {xla_unrolled / 1e9:.1f} GFLOP = "
          f"{xla_unrolled / r['model_flops']:.3f} x model FLOPs")
    print(f"XLA memory_analysis: temp {r['temp'] / 2**20:.0f} MiB + arguments "
          f"{r['arg'] / 2**20:.0f} MiB = {(r['temp'] + r['arg']) / 2**20:.0f} MiB")
    return r


def bench_fp8(args) -> dict:
    """Median step seconds and compiled temp + argument bytes of small_dense with
    model.fp8 = none and = args.fp8, timed interleaved (`time_interleaved`)."""
    calls, memory = {}, {}
    for recipe in ("none", args.fp8):
        model = dataclasses.replace(presets.small_dense(), dtype=args.dtype, remat=args.remat,
                                    fp8=recipe)
        config = config_lib.Config(model=model, train=config_lib.TrainConfig(
            steps=1000, batch_size=args.batch, seq_len=args.seq_len, warmup_steps=10))
        mesh, state, batch, step = build(config)
        compiled, _ = compile_step(mesh, state, batch, step)
        analysis = compiled.memory_analysis()
        memory[recipe] = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
        holder = {"state": state}

        def call(holder=holder, compiled=compiled, batch=batch):
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics

        calls[recipe] = (call, ())
    with parallel.use_mesh(mesh):
        timings = time_interleaved(calls, args.steps)
    step_s = {recipe: timing.median for recipe, timing in timings.items()}
    ratio = step_s[args.fp8] / step_s["none"]
    print(f"\n== fp8 {args.fp8} vs none: small_dense, batch {args.batch} x seq {args.seq_len}, "
          f"{args.dtype}, {args.steps} interleaved rounds")
    for recipe in calls:
        print(f"fp8={recipe:10s} step median {step_s[recipe] * 1e3:.0f} ms; compiled temp + "
              f"arguments {memory[recipe] / 2**20:.0f} MiB")
    print(f"fp8 / none step time {ratio:.2f} x (emulated where there is no fp8 matmul)")
    return dict(ratio=ratio, step_s=step_s, memory=memory)


def bench_reference(args, peaks, per_token: float) -> dict:
    """The same shape as a plain Flax decoder (`flax_reference.py`), timed the same way."""
    small = presets.small_dense()
    model = flax_reference.Decoder(
        small.vocab_size, small.embed_dim, small.num_layers, small.num_heads, small.mlp_dim
    )
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq_len + 1), 0,
                                small.vocab_size)
    params, opt_state, step = flax_reference.make_step(model, tokens)

    def train_step():
        nonlocal params, opt_state
        params, opt_state, loss = step(params, opt_state, tokens)
        return loss

    timing = time_calls(train_step, args.steps, warmup=args.warmup + 1)  # the first compiles
    times, step_s = timing.times, timing.median
    tokens_per_s = args.batch * args.seq_len / step_s
    mfu = tokens_per_s * per_token / peaks["float32"]
    print("\n== plain Flax reference, same shape, float32 (benchmarks/flax_reference.py)")
    print(f"step time median {step_s * 1e3:.0f} ms (min {min(times) * 1e3:.0f}); "
          f"tokens/s {tokens_per_s:,.0f}; MFU {mfu:.1%}")
    return dict(step_s=step_s, tokens_per_s=tokens_per_s, mfu=mfu)


def compile_scaling(args) -> dict:
    """Compile seconds of the train step for each (scan_layers, num_layers)."""
    print("\n== compile time vs depth: embed 256, 4 heads, mlp 768, vocab 512, "
          f"batch 2 x seq {min(args.seq_len, 128)}")
    out = {}
    for scan in (True, False) if not args.skip_unrolled else (True,):
        for layers in (args.shallow, args.deep):
            model = config_lib.ModelConfig(
                vocab_size=512, embed_dim=256, num_layers=layers, num_heads=4,
                num_kv_heads=4, mlp_dim=768, scan_layers=scan,
            )
            config = config_lib.Config(
                model=model, train=config_lib.TrainConfig(batch_size=2, seq_len=min(args.seq_len, 128))
            )
            _, seconds = compile_step(*build(config))
            out[scan, layers] = seconds
            print(f"scan_layers={scan!s:5} {layers:2d} layers: {seconds:5.2f} s")
        ratio = out[scan, args.deep] / out[scan, args.shallow]
        print(f"scan_layers={scan!s:5} {args.deep}/{args.shallow} layers: {ratio:.2f} x")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--remat", choices=("none", "full", "save_dots"), default="none")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--shallow", type=int, default=2)
    parser.add_argument("--deep", type=int, default=16)
    parser.add_argument("--skip-compile-check", action="store_true")
    parser.add_argument("--skip-unrolled", action="store_true",
                        help="compile check: scanned layers only")
    parser.add_argument("--fp8", choices=("none", "tensorwise", "blockwise"), default="none",
                        help="also time the step with this model.fp8 against none")
    parser.add_argument("--only-fp8", action="store_true", help="run only the --fp8 part")
    args = parser.parse_args()
    print(machine(load()))
    if args.fp8 != "none" and args.only_fp8:
        bench_fp8(args)
        print(f"\n`{command()}`")
        return

    print(f"\n== matmul peak, {args.matmul_size}^3")
    peaks = {}
    for dtype in ("float32", "bfloat16"):
        peaks[dtype] = flops.measure_matmul_peak(args.matmul_size, jnp.dtype(dtype))
        print(f"{dtype:8s} {peaks[dtype] / 1e9:8.1f} GFLOP/s")

    r = bench_step(args, peaks)
    reference = bench_reference(args, peaks, r["per_token"]) if args.dtype == "float32" else None
    scaling = {} if args.skip_compile_check else compile_scaling(args)
    fp8 = bench_fp8(args) if args.fp8 != "none" else None

    n = args.matmul_size
    rows = [
        (f"matmul peak float32 / bfloat16 ({n}^3)",
         f"{peaks['float32'] / 1e9:.0f} / {peaks['bfloat16'] / 1e9:.0f} GFLOP/s"),
        (f"small_dense step ({args.batch}x{args.seq_len}, {args.dtype}), median",
         f"{r['step_s'] * 1e3:.0f} ms"),
        ("tokens/s", f"{r['tokens_per_s']:,.0f}"),
        ("CPU cores busy while timing", f"{r['cores_used']:.2f} of {os.cpu_count()}"),
        (f"MFU (vs measured {args.dtype} peak)", f"{r['mfu']:.1%}"),
    ]
    if reference:
        rows += [
            ("plain Flax reference: tokens/s, MFU",
             f"{reference['tokens_per_s']:,.0f}, {reference['mfu']:.1%}"),
            ("jaxllm / plain Flax tokens/s", f"{r['tokens_per_s'] / reference['tokens_per_s']:.2f}"),
        ]
    rows += [
        ("XLA cost_analysis (unrolled) / model FLOPs", f"{r['xla_unrolled'] / r['model_flops']:.3f}"),
        ("XLA memory: temp + arguments",
         f"{r['temp'] / 2**20:.0f} + {r['arg'] / 2**20:.0f} MiB"),
        ("compile, small_dense step", f"{r['compile_s']:.1f} s"),
    ]
    if fp8:
        rows.append((f"fp8 {args.fp8} / none step time", f"{fp8['ratio']:.2f} x"))
    for scan in (True, False):
        if (scan, args.deep) in scaling:
            label = "scanned" if scan else "unrolled"
            rows.append((
                f"compile {args.shallow} -> {args.deep} layers, {label}",
                f"{scaling[scan, args.shallow]:.1f} -> {scaling[scan, args.deep]:.1f} s "
                f"({scaling[scan, args.deep] / scaling[scan, args.shallow]:.2f} x)",
            ))
    print(f"\n`{command()}`\n")
    print(table(("measure", "value"), rows))


if __name__ == "__main__":
    main()
