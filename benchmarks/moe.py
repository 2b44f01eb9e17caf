"""MoE benchmark: fwd+bwd of one MoE layer and the tiny_deepseek train step, each against a
dense SwiGLU with the same active parameters, in one run.

    python benchmarks/moe.py                                        # full run, ~9 min on 2 cores
    python benchmarks/moe.py --tokens 512 --reps 1 --train-steps 1  # smoke run

1. One layer, T tokens of width d, float32: the gradient of sum(layer(x)) for x and every
   parameter, at (E=8, k=2, expert width 2d) and (E=64, k=6, fine-grained width d/2), for
   - the MoE layer (`jaxllm.nn.moe.MoE`, router included) with each kernel and dispatch:
     ragged_dot, block_sparse and tiled dropless, and sorted_einsum with capacity;
   - the naive layer: every token through every expert, combined by the one-hot gates;
   - dense-active: one SwiGLU of width k x expert width, the active parameters of a token.
   Median times over rounds that time every layer once, each right after an untimed call of
   the same layer (the machine's drift hits all alike, and each finds its working set warm);
   ratios to dense-active; XLA cost_analysis FLOPs of each compiled step and their rate over
   the float32 matmul peak measured first (none for the tiled kernel: XLA counts the body
   of its loop once). The goals of the MoE design are MoE / dense-active <= 1.3 at E=8
   (<= 1.5 at E=64); the limit is 1.0 where both run their matmuls equally well.
2. The train step of `presets.tiny_deepseek` (as `benchmarks/train_step.py` builds it, one
   device) with each kernel and dispatch, against a dense model whose uniform mlp_dim gives
   the same active parameter count: tokens/s and XLA FLOPs (layers unrolled for the count).

Other processes on the same cores skew every number: the load average before and after the
run and the CPU cores busy while timing are printed.
"""

import argparse
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from timing import (command, cost_flops, load, load_after, machine, table, time_calls,
                    time_interleaved)
from train_step import build, compile_step

from jaxllm import config as config_lib
from jaxllm import parallel, presets
from jaxllm.config import MoEConfig
from jaxllm.nn import router
from jaxllm.nn.mlp import SwiGLU
from jaxllm.nn.moe import MoE
from jaxllm.train.flops import measure_matmul_peak
from jaxllm.train.state import count_params

# XLA's cost_analysis counts a loop body once: these kernels get no FLOP count.
LOOP_KERNELS = ("tiled",)

# (label, dispatch, kernel) of each MoE variant.
VARIANTS = (
    ("ragged_dot dropless", "dropless", "ragged_dot"),
    ("block_sparse dropless", "dropless", "block_sparse"),
    ("tiled dropless", "dropless", "tiled"),
    ("sorted_einsum capacity 1.25", "capacity", "sorted_einsum"),
)


def naive_moe(variables, x: jax.Array, cfg: MoEConfig) -> jax.Array:
    """The MoE layer's output computed by every expert on every token: x [B, S, D] -> [B, S, D],
    the unchosen experts masked by zero gates. E/k times the routed FLOPs."""
    params = variables["params"]
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ params["router"]["kernel"]
    weights, experts, _ = router.route(logits, None, cfg)
    gates = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(experts, cfg.num_experts))
    gate_up = jnp.einsum("td,edgf->tegf", flat, params["wi"])
    hidden = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :] * gates[..., None]
    return jnp.einsum("tef,efd->td", hidden, params["wo"]).reshape(x.shape)


def fwd_bwd(apply):
    """The jitted gradient of sum(apply(variables, x)) for the variables and x."""
    return jax.jit(jax.grad(lambda variables, x: jnp.sum(apply(variables, x)), argnums=(0, 1)))


def dropped_fraction(moe: MoE, variables, x) -> float:
    """The fraction of token-choices `moe` drops on x, from its sown metrics."""
    _, sown = moe.apply(variables, x, mutable=["moe_metrics"])
    return float(sown["moe_metrics"]["dropped_fraction"])


def layer_results(moe_cfg: MoEConfig, args) -> dict[str, tuple[dict, float | None]]:
    """Layer name -> (median fwd+bwd seconds, cores busy and XLA FLOPs; dropped fraction or
    None) at one MoE shape, the layers timed in interleaved rounds."""
    key_x, key_moe, key_dense = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (args.tokens // args.seq_len, args.seq_len, args.embed))
    dense = SwiGLU(moe_cfg.experts_per_token * moe_cfg.expert_dim + moe_cfg.resolved_shared_dim)
    dense_vars = nn.unbox(dense.init(key_dense, x))
    moe_vars = nn.unbox(MoE(moe_cfg).init(key_moe, x))
    layers = {"dense-active": (dense.apply, dense_vars, None, True)}
    for label, dispatch, kernel in VARIANTS:
        moe = MoE(dataclasses.replace(moe_cfg, dispatch=dispatch, kernel=kernel))
        layers[f"MoE {label}"] = (moe.apply, moe_vars, dropped_fraction(moe, moe_vars, x),
                                  kernel not in LOOP_KERNELS)
    layers["naive (every expert)"] = (
        functools.partial(naive_moe, cfg=moe_cfg), moe_vars, None, True
    )
    compiled = {name: fwd_bwd(apply).lower(variables, x).compile()
                for name, (apply, variables, _, _) in layers.items()}
    timed = time_interleaved(
        {name: (fn, (layers[name][1], x)) for name, fn in compiled.items()}, args.reps
    )
    return {
        name: (dict(seconds=timed[name].median, cores=timed[name].cores,
                    flops=cost_flops(fn) if layers[name][3] else None),
               layers[name][2])
        for name, fn in compiled.items()
    }


def flops_cells(flops: float | None, base: float) -> tuple[str, str]:
    """XLA GFLOP and their ratio to dense-active's ("n/a" for a loop kernel)."""
    if flops is None:
        return "n/a (loop)", "-"
    return f"{flops / 1e9:.2f}", f"{flops / base:.2f}"


def peak_cell(flops: float | None, seconds: float, peak: float) -> str:
    """XLA FLOP/s as a fraction of the measured matmul peak."""
    return "-" if flops is None else f"{flops / seconds / peak:.0%}"


def layer_rows(name: str, moe_cfg: MoEConfig, args, peak: float) -> list[tuple]:
    """Table rows of the layers at one shape: times and XLA FLOPs, each also over dense-active's,
    and XLA FLOP/s over the matmul peak; the dropped fraction of the MoE variants; CPU cores
    busy while timing."""
    results = layer_results(moe_cfg, args)
    base = results["dense-active"][0]
    rows = []
    for layer, (r, dropped) in results.items():
        rows.append((
            name, layer, f"{r['seconds'] * 1e3:.0f}", f"{r['seconds'] / base['seconds']:.2f}",
            *flops_cells(r["flops"], base["flops"]), peak_cell(r["flops"], r["seconds"], peak),
            "-" if dropped is None else f"{dropped:.1%}", f"{r['cores']:.2f}",
        ))
        print(" | ".join(rows[-1]), flush=True)
    return rows


def active_params(model: config_lib.ModelConfig, total: int) -> int:
    """Parameters a token uses: the total less the unchosen routed experts of each MoE layer."""
    moe = model.moe
    if moe is None:
        return total
    moe_layers = (model.num_layers - moe.first_dense_layers) // moe.moe_every
    idle = moe.num_experts - moe.experts_per_token
    return total - moe_layers * idle * 3 * model.embed_dim * moe.expert_dim


def dense_active(model: config_lib.ModelConfig, active: int, total: int) -> config_lib.ModelConfig:
    """`model` without MoE, its uniform mlp_dim sized so that its parameters match `active`."""
    dense = dataclasses.replace(model, moe=None)
    ffn = active - (total - feed_forward_params(model))
    return dataclasses.replace(dense, mlp_dim=round(ffn / (3 * model.embed_dim * model.num_layers)))


def feed_forward_params(model: config_lib.ModelConfig) -> int:
    """Parameters of all feed-forward layers: dense SwiGLUs, or routers, experts and shared."""
    d, moe = model.embed_dim, model.moe
    if moe is None:
        return model.num_layers * 3 * d * model.mlp_dim
    moe_layers = (model.num_layers - moe.first_dense_layers) // moe.moe_every
    dense_layers = model.num_layers - moe_layers
    per_moe = d * moe.num_experts + 3 * d * (moe.num_experts * moe.expert_dim
                                             + moe.resolved_shared_dim)
    return dense_layers * 3 * d * model.mlp_dim + moe_layers * per_moe


def bench_train(model: config_lib.ModelConfig, args) -> dict:
    """tokens/s of the train step, its parameter counts and XLA FLOPs (layers unrolled)."""
    train = config_lib.TrainConfig(steps=1000, batch_size=args.batch, seq_len=args.train_seq_len,
                                   warmup_steps=10)
    config = config_lib.Config(model=model, train=train)
    mesh, state, batch, step = build(config)
    total = count_params(state.params)
    compiled, _ = compile_step(mesh, state, batch, step)

    def train_step():
        nonlocal state
        state, metrics = compiled(state, batch)
        return metrics

    with parallel.use_mesh(mesh):
        timing = time_calls(train_step, args.train_steps)
    unrolled = dataclasses.replace(config, model=dataclasses.replace(model, scan_layers=False))
    mesh_u, state_u, batch_u, step_u = build(unrolled)
    with parallel.use_mesh(mesh_u):
        xla = cost_flops(step_u.lower(state_u, batch_u))
    step_s = timing.median
    return dict(total=total, active=active_params(model, total), step_s=step_s, cores=timing.cores,
                tokens_per_s=args.batch * args.train_seq_len / step_s, flops=xla)


def train_rows(args) -> list[tuple]:
    """Table rows of each tiny_deepseek variant and the dense-active model: parameters, step
    time, tokens/s and XLA FLOPs, each also over dense-active's; CPU cores busy."""
    deepseek = presets.tiny_deepseek()
    results = {}
    for label, dispatch, kernel in VARIANTS:
        moe = dataclasses.replace(deepseek.moe, dispatch=dispatch, kernel=kernel)
        r = bench_train(dataclasses.replace(deepseek, moe=moe), args)
        if kernel in LOOP_KERNELS:
            r["flops"] = None
        results[f"tiny_deepseek, {label}"] = r
    first = next(iter(results.values()))
    dense = dense_active(deepseek, first["active"], first["total"])
    results[f"dense-active (mlp_dim {dense.mlp_dim})"] = bench_train(dense, args)
    base = results[next(reversed(results))]
    rows = []
    for name, r in results.items():
        rows.append((name, f"{r['total']:,}", f"{r['active']:,}", f"{r['step_s'] * 1e3:.0f}",
                     f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}",
                     *flops_cells(r["flops"], base["flops"]), f"{r['cores']:.2f}"))
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per layer call")
    parser.add_argument("--seq-len", type=int, default=512, help="layer input: tokens/seq x seq")
    parser.add_argument("--embed", type=int, default=256, help="layer width d")
    parser.add_argument("--reps", type=int, default=5,
                        help="timed rounds of fwd+bwd calls, each round calling every layer once")
    parser.add_argument("--batch", type=int, default=16, help="train step: sequences")
    parser.add_argument("--train-seq-len", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=5, help="timed train steps")
    args = parser.parse_args()
    load_before = load()
    peak = measure_matmul_peak(2048)
    print(f"{machine(load_before)}, float32 matmul peak {peak / 1e9:.0f} GFLOP/s (2048^3)")

    d = args.embed
    shapes = (
        ("E=8, k=2", MoEConfig(num_experts=8, experts_per_token=2, expert_dim=2 * d)),
        ("E=64, k=6", MoEConfig(num_experts=64, experts_per_token=6, expert_dim=d // 2)),
    )
    print(f"\n== one layer, fwd+bwd, {args.tokens} tokens, d={d}, float32, softmax top-k")
    layers = [row for name, cfg in shapes for row in layer_rows(name, cfg, args, peak)]
    print("\n== train step: tiny_deepseek against dense-active, "
          f"batch {args.batch} x seq {args.train_seq_len}, float32")
    steps = train_rows(args)

    print(f"\n`{command()}`\n\n{load_after(load_before)} Float32 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s.\n")
    print(table(("shape", "layer", "fwd+bwd ms", "time / dense-active", "XLA GFLOP",
                 "FLOPs / dense-active", "XLA FLOP/s / peak", "dropped", "cores busy"), layers))
    print()
    print(table(("model", "params", "active params", "step ms", "tokens/s",
                 "tokens/s / dense-active", "XLA GFLOP (unrolled)", "FLOPs / dense-active",
                 "cores busy"), steps))


if __name__ == "__main__":
    main()
