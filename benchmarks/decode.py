"""Decode benchmark: KV-cache generation against full recompute, latency by position, cache bytes.

    python benchmarks/decode.py                       # full run, a few minutes on 2 cores
    python benchmarks/decode.py --lengths 16 32 --positions 32 64 --cache-len 64 \\
        --recompute-steps 4 --repeats 1               # smoke run

A small dense model (4 layers, embed 256, GQA 8/2 heads, vocab 512), random weights, float32,
greedy, a batch of equal-length random prompts:

1. Decode tokens/s at each output length N: `jaxllm.infer.generate` (jitted prefill and
   while loop over the KV cache) against a jitted greedy loop that recomputes the full
   forward pass over a fixed [B, prompt + N] buffer for every new token. Every recompute
   step does the same work whatever its index, so when N exceeds `--recompute-steps` only
   the first steps are timed and the rate is extrapolated (marked in the table). A recompute
   over the growing prefix alone would do less work on average (table 2 gives its cost at
   each p). The first tokens of both paths are compared: greedy recompute is the reference.
2. Latency of one token against context length p: a jitted `decode_step` (cache donated, as
   in the loop) on a cache of `--cache-len` slots holding p tokens, against one full forward
   pass over the p-token prefix. The cached step attends over every slot, masked, so its
   cost depends on the cache size, not on p; the recompute grows with p.
3. KV-cache bytes per sequence for MHA, GQA, MQA, MLA and sliding-window variants of the
   model, read off the shapes of the model's own "cache" collection (`jax.eval_shape` of
   `init_cache`), against each layout's formula.

Other processes on the same cores skew every time: the load averages before and after the
run are printed so that a noisy run can be spotted and rerun.
"""

import argparse
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from timing import command, load, load_after, machine, table, time_calls

from jaxllm.config import AttentionConfig, MLAConfig, ModelConfig
from jaxllm.infer import decode_step, generate, init_cache
from jaxllm.nn import Transformer


@functools.partial(jax.jit, static_argnames=("model", "total_len"))
def recompute_greedy(model, params, prompts, steps, *, total_len):
    """Greedy decoding without a cache: `steps` (traced) tokens after `prompts` [B, P], each
    from a full forward pass over the whole [B, total_len] buffer. Returns [B, total_len - P]
    tokens, 0 after the first `steps`."""
    batch, prompt_len = prompts.shape
    buffer = jnp.zeros((batch, total_len), jnp.int32).at[:, :prompt_len].set(prompts)

    def body(i, buffer):
        logits = model.apply({"params": params}, buffer)
        last = jax.lax.dynamic_index_in_dim(logits, prompt_len + i - 1, axis=1, keepdims=False)
        return buffer.at[:, prompt_len + i].set(jnp.argmax(last, axis=-1).astype(jnp.int32))

    return jax.lax.fori_loop(0, steps, body, buffer)[:, prompt_len:]


@functools.partial(jax.jit, static_argnames="model")
def recompute_next(model, params, tokens):
    """The greedy next token [B] after `tokens` [B, p], from one full forward pass."""
    return jnp.argmax(model.apply({"params": params}, tokens)[:, -1], axis=-1)


def filled_to(cache: dict, length: int) -> dict:
    """`cache` with every layer's `cache_index` at `length`: slots 0 .. length - 1 in use."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, length) if path[-1].key == "cache_index" else x, cache
    )


def bench_throughput(args, model, params, prompts) -> list[dict]:
    """Cached `generate` against recompute, tokens/s at each output length."""
    batch, prompt_len = prompts.shape
    rows = []
    for length in args.lengths:
        run_cached = functools.partial(
            generate, model, params, prompts.tolist(), max_new_tokens=length, temperature=0.0
        )
        timing = time_calls(run_cached, args.repeats)  # the warm-up compiles
        cached_s, cached = timing.median, timing.out

        steps = min(length, args.recompute_steps)
        run_full = functools.partial(
            recompute_greedy, model, params, prompts, total_len=prompt_len + length
        )
        jax.block_until_ready(run_full(1))  # compile
        # One run of `steps` steps: each step does the same work.
        timing = time_calls(functools.partial(run_full, steps), 1, warmup=0)
        full_s, full = timing.median, timing.out
        agree = float(np.mean(np.asarray(cached.tokens[:, :steps]) == np.asarray(full[:, :steps])))
        row = dict(
            length=length, cached_s=cached_s, cached_tps=batch * length / cached_s,
            full_tps=batch * steps / full_s, steps=steps, agree=agree,
        )
        row["speedup"] = row["cached_tps"] / row["full_tps"]
        rows.append(row)
        print(f"N={length:5d}: cached {row['cached_tps']:9,.0f} tok/s ({cached_s:.2f} s); "
              f"recompute {row['full_tps']:7,.1f} tok/s ({steps} steps in {full_s:.2f} s); "
              f"x{row['speedup']:.1f}; first {steps} tokens agree {agree:.0%}")
    return rows


def bench_latency(args, model, params, prompts) -> list[dict]:
    """Per-token seconds against context length: cached decode step and full recompute."""
    batch = prompts.shape[0]
    variables = {"params": params}
    step = jax.jit(functools.partial(decode_step, model), donate_argnums=1)
    tokens = jnp.asarray(prompts[:, 0])
    cache = init_cache(model, batch, args.cache_len)
    _, cache = step(variables, cache, tokens, jnp.zeros((batch,), jnp.int32))  # compile
    rows = []
    for position in args.positions:
        cache = filled_to(cache, position - args.step_repeats)
        slots = iter([jnp.full((batch,), slot, jnp.int32)  # fill up to `position`
                      for slot in range(position - args.step_repeats, position)])

        def next_step():
            nonlocal cache
            logits, cache = step(variables, cache, tokens, next(slots))
            return logits

        cached_s = time_calls(next_step, args.step_repeats, warmup=0).median
        context = jnp.asarray(np.resize(prompts, (batch, position)))
        run_full = functools.partial(recompute_next, model, params, context)
        full_s = time_calls(run_full, args.repeats).median  # the warm-up compiles
        rows.append(dict(position=position, cached_s=cached_s, full_s=full_s))
        print(f"p={position:5d}: cached step {cached_s * 1e3:7.2f} ms; "
              f"recompute {full_s * 1e3:9.1f} ms")
    return rows


def cache_bytes(config: ModelConfig, context: int) -> list[dict]:
    """Bytes of the "cache" collection for one sequence of `context` tokens (MHA, GQA, MQA,
    MLA, and GQA with sliding-window layers), without allocating it, against each layout's
    formula; `cache_index` (one int per layer) is excluded."""
    layers, head_dim = config.num_layers, config.resolved_head_dim
    itemsize = jnp.dtype(config.dtype).itemsize
    mla = MLAConfig(kv_lora_rank=64, qk_nope_head_dim=head_dim, qk_rope_head_dim=16,
                    v_head_dim=head_dim)
    window = 256

    def gqa(kv_heads):
        return 2 * layers * kv_heads * head_dim * itemsize * context

    variants = {  # name: (config, formula)
        "MHA": (dataclasses.replace(config, num_kv_heads=config.num_heads),
                gqa(config.num_heads)),
        "GQA": (config, gqa(config.num_kv_heads)),
        "MQA": (dataclasses.replace(config, num_kv_heads=1), gqa(1)),
        "MLA (latent 64 + rope 16)": (
            dataclasses.replace(config, num_kv_heads=config.num_heads,
                                attention=AttentionConfig(mla=mla)),
            layers * (64 + 16) * itemsize * context),
        f"GQA, sliding window {window}": (  # the ring: key, value and a position per slot
            dataclasses.replace(config, attention=AttentionConfig(pattern="sliding",
                                                                  window=window)),
            gqa(config.num_kv_heads) * min(window, context) // context
            + layers * 4 * min(window, context)),
    }
    rows = []
    for name, (cfg, formula) in variants.items():
        shapes = jax.eval_shape(lambda cfg=cfg: init_cache(Transformer(cfg), 1, context))
        leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
        total = sum(
            x.size * x.dtype.itemsize for path, x in leaves if path[-1].key != "cache_index"
        )
        rows.append(dict(
            name=name, heads=f"{cfg.num_heads}/{cfg.num_kv_heads}", total=total,
            per_token_layer=total / context / cfg.num_layers, formula=formula,
        ))
    return rows


def print_tables(args, config, throughput, latency, memory, command) -> None:
    """One markdown table per measure."""
    model = (f"{config.num_layers} layers, embed {config.embed_dim}, heads "
             f"{config.num_heads}/{config.num_kv_heads}, vocab {config.vocab_size}, "
             f"{config.dtype}")
    print(f"\n`{command}`\n")
    print(f"Decode throughput, greedy, batch {args.batch}, prompt {args.prompt_len}; {model}\n")
    cells = []
    for r in throughput:
        note = "" if r["steps"] == r["length"] else f" (first {r['steps']} steps, extrapolated)"
        cells.append((str(r["length"]), f"{r['cached_tps']:,.0f}", f"{r['full_tps']:,.1f}{note}",
                      f"{r['speedup']:.1f} x", f"{r['agree']:.0%} of first {r['steps']}"))
    print(table(("new tokens", "cached tok/s", "recompute tok/s", "speedup", "tokens agree"),
                cells))
    print(f"\nPer-token latency by context length, batch {args.batch}; cache of "
          f"{args.cache_len} slots\n")
    cells = [(str(r["position"]), f"{r['cached_s'] * 1e3:.2f} ms", f"{r['full_s'] * 1e3:.1f} ms",
              f"{r['full_s'] / r['cached_s']:.1f} x") for r in latency]
    print(table(("context p", f"cached decode_step, {args.batch} rows",
                 f"full recompute, {args.batch} rows", "recompute / cached"), cells))
    cached = [r["cached_s"] for r in latency]
    print(f"\nCached step, slowest / fastest over p: {max(cached) / min(cached):.2f}")
    print(f"\nKV-cache bytes, {config.num_layers} layers, head_dim "
          f"{config.resolved_head_dim}, {config.dtype}, context {args.context}\n")
    cells = [(r["name"], r["heads"], f"{r['total'] / 2**20:.2f} MiB",
              f"{r['per_token_layer']:,.0f} B", "yes" if r["formula"] == r["total"] else "NO")
             for r in memory]
    print(table(("attention", "heads q/kv", "per sequence", "per token per layer",
                 "= the layout's formula"), cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048],
                        help="output lengths N for the throughput table")
    parser.add_argument("--positions", type=int, nargs="+", default=[128, 512, 1024, 2048],
                        help="context lengths p for the latency table (<= --cache-len)")
    parser.add_argument("--cache-len", type=int, default=2048)
    parser.add_argument("--context", type=int, default=None,
                        help="context length of the cache-bytes table (default --cache-len)")
    parser.add_argument("--recompute-steps", type=int, default=4,
                        help="recompute steps timed per output length, at most")
    parser.add_argument("--step-repeats", type=int, default=16,
                        help="cached decode steps timed per context length")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs (median) of each generate and recompute forward")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embed", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--mlp", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    args.context = args.context or args.cache_len
    if max(args.positions) > args.cache_len or min(args.positions) < args.step_repeats:
        parser.error(f"--positions: each must lie in [{args.step_repeats}, {args.cache_len}]")

    load_before = load()
    print(machine(load_before))

    config = ModelConfig(
        vocab_size=args.vocab, embed_dim=args.embed, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, mlp_dim=args.mlp, dtype=args.dtype,
    )
    model = Transformer(config)
    init = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    params = nn.meta.unbox(init["params"])
    prompts = np.random.default_rng(0).integers(
        0, args.vocab, (args.batch, args.prompt_len), np.int32
    )

    print("\n== decode throughput")
    throughput = bench_throughput(args, model, params, prompts)
    print("\n== per-token latency by context length")
    latency = bench_latency(args, model, params, prompts)
    memory = cache_bytes(config, args.context)
    loads = load_after(load_before)
    print_tables(args, config, throughput, latency, memory, command())
    print(f"\n{loads}")


if __name__ == "__main__":
    main()
