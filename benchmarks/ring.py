"""Context-parallel attention benchmark: per-device memory, reach and time on 8 CPU devices.

    python benchmarks/ring.py                # full run, a few minutes on 2 cores
    python benchmarks/ring.py --length 2048 --time-length 1024 --reach-max 16384  # smoke run

1. Memory: per-device temp bytes of the compiled fwd+bwd (`memory_analysis()`) at a fixed total
   length S, for n = 1, 2, 4, 8 devices on the `context` axis: ring attention with its custom
   VJP, ring attention differentiated through the scan, and the all-gather baseline; one
   device's full attention (`dot_product_attention`) for reference.
2. Reach: the longest power-of-two S whose compiled per-device memory (arguments + outputs +
   temp) stays under a budget, at n = 1 and n = 8.
3. Time: fwd+bwd of ring (plain and zigzag order) against all-gather at the same S on 8
   simulated devices. The devices share the host's cores, so the times are indicative only:
   they measure total work, not the critical path that the zigzag order shortens (plain and
   zigzag skip the same number of chunk pairs in all).

All runs are causal, one sequence, float32.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import functools

import jax
import jax.numpy as jnp
from timing import MIB, command, load, resident_bytes, table, temp_bytes, time_calls

from jaxllm import Config, MeshConfig, parallel
from jaxllm.nn.masks import causal_segment_mask
from jaxllm.nn.naive import dot_product_attention
from jaxllm.nn.context_order import permutation, to_context_order
from jaxllm.nn.ring import all_gather_attention, ring_attention

def inputs(length: int, heads: int, kv_heads: int, dim: int):
    """Abstract q, k, v, positions and segment ids for one sequence."""
    f32, i32 = jnp.float32, jnp.int32
    return (jax.ShapeDtypeStruct((1, length, heads, dim), f32),
            *[jax.ShapeDtypeStruct((1, length, kv_heads, dim), f32)] * 2,
            *[jax.ShapeDtypeStruct((1, length), i32)] * 2)


def fwd_bwd(attention):
    """A jitted step: the attention output and the gradients of sum(out) for q, k and v."""

    def loss(q, k, v, pos, seg):
        return jnp.sum(attention(q, k, v, pos, seg))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def kernels(n: int) -> dict:
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=1, context=n)), jax.devices()[:n])
    return {
        "ring": functools.partial(ring_attention, mesh=mesh),
        "ring, autodiff": functools.partial(ring_attention, mesh=mesh, custom_vjp=False),
        "all-gather": functools.partial(all_gather_attention, mesh=mesh),
    }


def full_attention(q, k, v, pos, seg):
    return dot_product_attention(q, k, v, causal_segment_mask(seg))


def compiled_memory(attention, args) -> tuple[int, int]:
    """(temp bytes, arguments + outputs + temp bytes) per device of the compiled fwd+bwd."""
    compiled = fwd_bwd(attention).lower(*args).compile()
    return temp_bytes(compiled), resident_bytes(compiled)


def memory_table(length: int, shape: tuple[int, int, int]) -> list[str]:
    args = inputs(length, *shape)
    temps = {n: {name: compiled_memory(fn, args)[0] for name, fn in kernels(n).items()}
             for n in (1, 2, 4, 8)}
    names = list(temps[1])
    rows = [f"| n | {' | '.join(f'{name} (MiB)' for name in names)} | ring vs n=1 |",
            "|---|" + "---|" * (len(names) + 1)]
    for n, temp in temps.items():
        cells = " | ".join(f"{temp[name] / MIB:.1f}" for name in names)
        rows.append(f"| {n} | {cells} | {temp['ring'] / temps[1]['ring']:.3f} |")
    full = compiled_memory(full_attention, args)[0]
    rows.append(f"\nOne device, full attention (`dot_product_attention`): {full / MIB:.1f} MiB.")
    return rows


def reach(n: int, budget: int, shape, max_length: int) -> int:
    """The longest power-of-two S (from 1024) under `budget` bytes per device, or 0."""
    best, length = 0, 1024
    ring = kernels(n)["ring"]
    while length <= max_length and compiled_memory(ring, inputs(length, *shape))[1] <= budget:
        best, length = length, 2 * length
    return best


def time_table(length: int, shape, repeats: int) -> str:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, a.shape) for key, a in zip(keys, inputs(length, *shape)))
    pos = jnp.arange(length)[None]
    seg = jnp.zeros_like(pos)
    fns = kernels(8)
    rows = []
    for name, order in (("all-gather", "plain"), ("ring", "plain"), ("ring", "zigzag")):
        args = to_context_order((q, k, v, pos, seg), permutation(order, length, 8))
        step = fwd_bwd(fns[name])
        rows.append((name, order, f"{time_calls(lambda: step(*args), repeats).median:.3f}"))
    return table(("kernel (8 devices)", "order", "fwd+bwd (s)"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192, help="total S of the memory table")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--budget-mib", type=int, default=256, help="reach: memory per device")
    parser.add_argument("--reach-max", type=int, default=2**20, help="reach: longest S tried")
    parser.add_argument("--time-length", type=int, default=4096, help="total S of the timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = (args.heads, args.kv_heads, args.head_dim)

    print(f"command: {command()}")
    print(f"load average (1 min) before the run: {load():.2f}\n")
    print(f"## Memory: per-device temp of fwd+bwd, S={args.length}, heads {args.heads}/"
          f"{args.kv_heads}, head dim {args.head_dim}\n")
    print("\n".join(memory_table(args.length, shape)))
    print(f"\n## Reach: longest S under {args.budget_mib} MiB per device (ring)\n")
    print("| n | S |\n|---|---|")
    for n in (1, 8):
        print(f"| {n} | {reach(n, args.budget_mib * MIB, shape, args.reach_max)} |")
    print(f"\n## Time: S={args.time_length}, median of {args.repeats} (indicative: 8 simulated "
          "devices share the host's cores)\n")
    print(time_table(args.time_length, shape, args.repeats))


if __name__ == "__main__":
    main()
