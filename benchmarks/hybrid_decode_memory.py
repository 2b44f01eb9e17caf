"""Decode memory of a hybrid Mamba-2 + attention stack against the all-attention stack it
replaces, at long contexts.

    python benchmarks/hybrid_decode_memory.py                    # 8k and 32k, a few minutes
    python benchmarks/hybrid_decode_memory.py --contexts 1024    # smoke run

The all-attention model is `presets.llama3_1b` (16 layers, d 2048, GQA 32/8 heads of 64,
bf16). The hybrid keeps its width and depth and turns three of every four layers into
Mamba-2 layers (pattern ssm,ssm,ssm,global, as Nemotron-H and Qwen3-Next mix them) of
Mamba-2's defaults: 64 heads of 64 (2 x d), state 128, conv of 4 taps.

For each context L, one sequence:

1. the bytes of the decoding model's "cache" collection, exact, from the shapes of its
   own `init_cache` (`calculator.kv_cache_bytes`), split into the attention layers' KV
   cache and the SSM layers' conv and SSM state;
2. XLA's view of one jitted `decode_step` compiled for those shapes: its argument bytes
   less the parameters and the token (the cache it reads), and its temporary bytes (the
   working memory of a step: attention scores over the whole cache, the SSM update).

Nothing is allocated: shapes come from `jax.eval_shape` and the step is compiled, not run.
"""

import argparse
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from timing import MIB, command, load, machine, table

from jaxllm import calculator, presets
from jaxllm.config import AttentionConfig, ModelConfig, SSMConfig
from jaxllm.infer import decode_step, init_cache
from jaxllm.nn import Transformer


def models() -> dict[str, ModelConfig]:
    base = presets.llama3_1b()
    ssm = SSMConfig(num_heads=64, head_dim=64, state_dim=128, conv_width=4, chunk=256)
    hybrid = dataclasses.replace(base, attention=AttentionConfig(
        pattern="ssm,ssm,ssm,global", ssm=ssm))
    return {"all attention": base, "hybrid 3:1": hybrid}


def split_cache_bytes(cfg: ModelConfig, context: int) -> tuple[int, int]:
    """(attention KV bytes, SSM state bytes) of one sequence's cache, from its shapes."""
    cache = jax.eval_shape(lambda: init_cache(Transformer(cfg), 1, context))
    attention = ssm = 0
    for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]:
        keys = [p.key for p in path]
        if keys[-1] == "cache_index":
            continue
        if "ssm" in keys:
            ssm += x.size * x.dtype.itemsize
        else:
            attention += x.size * x.dtype.itemsize
    return attention, ssm


def compiled_step_bytes(cfg: ModelConfig, context: int) -> tuple[int, int]:
    """(cache bytes as the compiled decode step's arguments hold them, the step's temporary
    bytes), from XLA's memory analysis of `decode_step` compiled for one sequence."""
    model = Transformer(cfg)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    cache = jax.eval_shape(lambda: init_cache(model, 1, context))
    token = jax.ShapeDtypeStruct((1,), jnp.int32)
    step = jax.jit(functools.partial(decode_step, model), donate_argnums=1)
    compiled = step.lower({"params": params}, cache, token, token).compile()
    stats = compiled.memory_analysis()
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return stats.argument_size_in_bytes - param_bytes - 2 * 4, stats.temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    args = parser.parse_args()
    load_before = load()
    print(machine(load_before))
    rows = []
    for context in args.contexts:
        for name, cfg in models().items():
            attention, ssm = split_cache_bytes(cfg, context)
            exact = calculator.kv_cache_bytes(cfg, context)
            assert exact == attention + ssm, (exact, attention, ssm)
            xla, temp = compiled_step_bytes(cfg, context)
            rows.append(dict(context=context, name=name, attention=attention, ssm=ssm,
                             exact=exact, xla=xla, temp=temp))
            print(f"L={context}, {name}: cache {exact / MIB:.1f} MiB, XLA {xla / MIB:.1f} MiB,"
                  f" step temporaries {temp / MIB:.1f} MiB", flush=True)
    print(f"\n`{command()}`\n")
    full = {r["context"]: r["exact"] for r in rows if r["name"] == "all attention"}
    cells = [(f"{r['context']:,}", r["name"], f"{r['attention'] / MIB:,.1f}",
              f"{r['ssm'] / MIB:,.2f}", f"{r['exact'] / MIB:,.1f}", f"{r['xla'] / MIB:,.1f}",
              f"{r['exact'] / full[r['context']]:.3f}", f"{r['temp'] / MIB:,.1f}")
             for r in rows]
    print(table(("context", "model", "KV cache MiB", "SSM state MiB", "cache MiB (exact)",
                 "cache MiB (XLA arguments)", "vs all attention", "step temporaries MiB"),
                cells))

if __name__ == "__main__":
    main()
