"""The KV-cache sampler against full recompute: cached logits, greedy decoding, stop tokens,
padding, top-k/top-p sets, and a sharded mesh against one device."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_model
from jaxllm import Config, MeshConfig, MoEConfig, parallel
from jaxllm.config import AttentionConfig, SSMConfig
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.infer import (
    EFFORTS, Effort, Sampler, SamplingConfig, ThinkTokens, decode_step, filter_logits, generate,
    left_pad, prefill,
)
from jaxllm.infer import sample as sample_tokens
from jaxllm.infer.stream import stream
from jaxllm.nn import Transformer

PROMPTS = [[5, 17, 33, 2, 9], [70, 71], [3, 1, 4, 1, 5, 9, 2], [8]]
# A dense block then a sigmoid-routed MoE block, scanned as one layer group.
MOE = MoEConfig(num_experts=4, experts_per_token=2, expert_dim=32, router="sigmoid", moe_every=2)
CONFIGS = {
    "mha_unrolled": tiny_model(num_layers=1, num_kv_heads=8, scan_layers=False),
    "gqa": tiny_model(num_kv_heads=4),
    "mqa": tiny_model(num_kv_heads=1),
    "moe": tiny_model(moe=MOE),
    # A Mamba-2 layer then a global one; chunks of 3 cut the prompts and pad them.
    "hybrid": tiny_model(attention=AttentionConfig(
        pattern="ssm,global", ssm=SSMConfig(num_heads=4, head_dim=16, state_dim=8, chunk=3))),
}


def random_variables(model, seed=0):
    """Random params and MoE selection biases, drawn in numpy: no init to compile.

    Norm scales are near 1, everything else near 0; any values test exactness.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    shapes = nn.meta.unbox({k: v for k, v in shapes.items() if k in ("params", "moe_bias")})
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
        return noise + (jax.tree_util.keystr(path).endswith("['scale']"))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def right_padded(rows, width):
    """rows -> [B, width] int32 with zeros after each row; causal, so padding is harmless."""
    out = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


@functools.partial(jax.jit, static_argnums=0)
def full_logits(model, variables, tokens):
    return model.apply(variables, tokens)


@functools.partial(jax.jit, static_argnums=0)
def cached_and_full_logits(model, variables, prompts, lengths, continuation, full_tokens,
                           patches=None):
    """Teacher-forced decoding through the cache: the logits before each continuation
    token [steps, B, V], and the full forward pass over the whole rows [B, S, V]; `patches`,
    the images of the prompts' `<patch>` tokens, or None."""
    steps = continuation.shape[1]
    start = prefill(model, variables, prompts, lengths, prompts.shape[1] + steps, patches)

    def step(carry, inputs):
        logits, cache = carry
        token, i = inputs
        return decode_step(model, variables, cache, token, lengths + i), logits

    _, cached = jax.lax.scan(step, start, (continuation.T, jnp.arange(steps)))
    return cached, model.apply(variables, full_tokens, patches=patches)


def cached_and_recomputed(model, variables, steps: int = 5):
    """Teacher-forced decoding of PROMPTS plus `steps` random tokens: the cached logits
    before each continuation token and the full forward pass's at the same places, both
    [steps, B, V]."""
    continuation = np.asarray(jax.random.randint(jax.random.key(2), (len(PROMPTS), steps), 0, 256))
    rows = [p + list(c) for p, c in zip(PROMPTS, continuation)]
    tokens, lengths = left_pad(PROMPTS, pad_id=0)
    cached, full = cached_and_full_logits(
        model, variables, tokens, lengths, continuation, right_padded(rows, max(map(len, rows)))
    )
    expected = np.stack([full[np.arange(len(rows)), lengths + i - 1] for i in range(steps)])
    return np.asarray(cached), expected


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decode_logits_match_full_recompute_at_every_step(name):
    model = Transformer(CONFIGS[name])
    np.testing.assert_allclose(*cached_and_recomputed(model, random_variables(model)), atol=1e-5)


def greedy_reference(model, variables, prompts, steps):
    """Argmax stepping with the full forward pass recomputed over the whole prefix."""
    rows = [list(p) for p in prompts]
    logprobs = []
    for _ in range(steps):
        logits = full_logits(model, variables, right_padded(rows, max(map(len, prompts)) + steps))
        last = jax.nn.log_softmax(logits[np.arange(len(rows)), [len(r) - 1 for r in rows]])
        best = np.asarray(jnp.argmax(last, axis=-1))
        logprobs.append(np.asarray(last)[np.arange(len(rows)), best])
        rows = [r + [int(t)] for r, t in zip(rows, best)]
    tokens = np.array([r[len(p):] for r, p in zip(rows, prompts)])
    return tokens, np.stack(logprobs, axis=1)


@pytest.fixture(scope="module")
def gqa():
    """A GQA model over the byte tokenizer's vocabulary."""
    tokenizer = ByteTokenizer()
    model = Transformer(tiny_model(vocab_size=tokenizer.vocab_size))
    return model, random_variables(model)["params"], tokenizer


def test_greedy_is_deterministic_and_equals_argmax_stepping_with_full_forward(gqa):
    model, params, _ = gqa
    want_tokens, want_logprobs = greedy_reference(model, {"params": params}, PROMPTS, 6)
    first = generate(model, params, PROMPTS, max_new_tokens=6, temperature=0)
    again = generate(model, params, PROMPTS, max_new_tokens=6, temperature=0)
    np.testing.assert_array_equal(first.tokens, want_tokens)
    np.testing.assert_allclose(first.logprobs, want_logprobs, atol=1e-5)
    np.testing.assert_array_equal(first.lengths, [6] * len(PROMPTS))
    jax.tree.map(np.testing.assert_array_equal, first, again)


def test_stop_tokens_end_each_row_and_pad_the_rest(gqa):
    model, params, _ = gqa
    free = jax.device_get(generate(model, params, PROMPTS, max_new_tokens=6, temperature=0))
    free_tokens = free.tokens
    stop, pad = int(free_tokens[0, 2]), 7
    got = jax.device_get(generate(
        model, params, PROMPTS, max_new_tokens=6, temperature=0, stop_ids=(stop,), pad_id=pad
    ))
    for row, (tokens, logprobs, length) in enumerate(zip(got.tokens, got.logprobs, got.lengths)):
        hits = np.flatnonzero(free_tokens[row] == stop)
        assert length == (hits[0] + 1 if hits.size else 6)
        np.testing.assert_array_equal(tokens[:length], free_tokens[row, :length])
        np.testing.assert_allclose(logprobs[:length], free.logprobs[row, :length], atol=1e-6)
        assert np.all(tokens[length:] == pad) and np.all(logprobs[length:] == 0)
    assert got.lengths[0] <= 3


def test_a_prompts_output_does_not_depend_on_the_rest_of_its_batch(gqa):
    model, params, _ = gqa
    batch = jax.device_get(generate(model, params, PROMPTS, max_new_tokens=6, temperature=0))
    alone = jax.device_get(generate(
        model, params, [PROMPTS[1]] * 4, max_new_tokens=6, temperature=0,
        prompt_len=len(PROMPTS[2]),
    ))
    for row in range(4):
        np.testing.assert_array_equal(alone.tokens[row], batch.tokens[1])
        np.testing.assert_allclose(alone.logprobs[row], batch.logprobs[1], atol=1e-5)


def thinking_lengths(tokens, think: ThinkTokens):
    """numpy: tokens each row emits inside a thought; every row starts inside one."""
    counts = []
    for row in np.asarray(tokens):
        inside, count = True, 0
        for token in row:
            inside = inside and token != think.close or token == think.open
            count += inside and token != think.open
        counts.append(count)
    return np.array(counts)


@pytest.mark.parametrize("budget", [0, 3])
def test_thinking_never_exceeds_the_budget_and_instant_does_not_think(gqa, budget):
    model, params, tokenizer = gqa
    sampler = Sampler(model, params, tokenizer)
    prompts = [p + [sampler.think.open] for p in PROMPTS]
    got = jax.device_get(sampler.generate(
        prompts, max_new_tokens=8, rng=jax.random.key(budget), effort=Effort(budget),
        think=sampler.think, stop_ids=(), prompt_len=8,
    ))
    assert np.all(thinking_lengths(got.tokens, sampler.think) <= budget)
    assert np.all(np.any(got.tokens[:, : budget + 1] == sampler.think.close, axis=1))
    if budget == 0:
        np.testing.assert_array_equal(got.tokens[:, 0], sampler.think.close)


def test_sampler_completes_text_and_opens_a_forced_thought(gqa):
    model, params, tokenizer = gqa
    sampler = Sampler(model, params, tokenizer)
    texts = ["1+2=", "x", "12*3=", "ab"]
    got = sampler.complete(
        texts, effort="instant", max_new_tokens=8, rng=jax.random.key(0), prompt_len=8
    )
    prompts = [tokenizer.encode(t) + [sampler.think.open] for t in texts]
    want = jax.device_get(sampler.generate(
        prompts, max_new_tokens=8, rng=jax.random.key(0), effort=EFFORTS["instant"],
        think=sampler.think, prompt_len=8,
    ))
    for text, tokens, length in zip(got, want.tokens, want.lengths):
        assert text == tokenizer.decode(tokens[:length]) and text.startswith("</think>")


def allowed_probs(logits, temperature, top_k, top_p):
    """numpy: the renormalised distribution over the top-k, then top-p, set."""
    probs = np.exp(logits / temperature - np.max(logits / temperature))
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = order[: top_k or len(order)]
    if top_p is not None:
        mass = np.cumsum(probs[keep] / probs[keep].sum())
        keep = keep[: int(np.searchsorted(mass, top_p)) + 1]
    out = np.zeros_like(probs)
    out[keep] = probs[keep] / probs[keep].sum()
    return out


@functools.partial(jax.jit, static_argnums=2)
def filtered_probs_and_samples(rng, logits, config):
    return jax.nn.softmax(filter_logits(logits[:1], config))[0], sample_tokens(rng, logits, config)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 3, None), (1.0, None, 0.7), (0.7, 5, 0.8), (1.0, None, 0.01)]
)
def test_top_k_and_top_p_sample_only_the_allowed_set_in_proportion(temperature, top_k, top_p):
    logits = np.log(np.array([0.3, 0.05, 0.2, 0.01, 0.15, 0.12, 0.07, 0.1], np.float32))
    want = allowed_probs(logits, temperature, top_k, top_p)
    draws = 20_000
    probs, samples = filtered_probs_and_samples(
        jax.random.key(0), jnp.broadcast_to(logits, (draws, len(logits))),
        SamplingConfig(temperature, top_k, top_p),
    )
    np.testing.assert_allclose(probs, want, atol=1e-6)
    freq = np.bincount(np.asarray(samples), minlength=len(logits)) / draws
    assert np.all(freq[want == 0] == 0), "sampled outside the allowed set"
    np.testing.assert_allclose(freq, want, atol=0.02)


def test_top_p_of_one_keeps_every_token():
    """The float32 running sum of a peaked distribution reaches 1 before its tail."""
    logits = jnp.array([[20.0, 0.0, 0.0, -1.0]])
    kept = filter_logits(logits, SamplingConfig(top_p=1.0))
    np.testing.assert_array_equal(kept, logits)
    assert np.isinf(filter_logits(logits, SamplingConfig(top_p=0.999))[0, 1:]).all()


def test_sharded_sampler_and_cache_match_one_device(gqa):
    model, params, _ = gqa
    prompts = PROMPTS
    kwargs = dict(max_new_tokens=6, temperature=0)
    want = generate(model, params, prompts, **kwargs)
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=2, tensor=2)), jax.devices()[:4])
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), int))["params"]
    with parallel.use_mesh(mesh):
        sharded = jax.device_put(params, parallel.shardings(boxed, mesh))
        got = generate(model, sharded, prompts, **kwargs)
        tokens, lengths = left_pad(prompts, pad_id=0)
        _, cache = jax.jit(prefill, static_argnums=(0, 4))(
            model, {"params": sharded}, tokens, lengths, 16
        )
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    key = cache["decoder"]["layers"]["attn"]["cached_key"]  # [layers, B, L, K, D]
    assert key.shape == (2, 4, 16, 4, 8)
    assert key.sharding.shard_shape(key.shape) == (2, 2, 16, 2, 8)


def test_streaming_yields_the_tokens_the_batched_loop_generates(gqa):
    model, params, tokenizer = gqa
    sampler = Sampler(model, params, tokenizer)
    prompt = PROMPTS[1] + [sampler.think.open]
    want = jax.device_get(sampler.generate(
        [prompt], max_new_tokens=6, rng=jax.random.key(3), effort=Effort(2), think=sampler.think,
        stop_ids=(tokenizer.special["</answer>"], tokenizer.eos_id),
    ))
    got = list(stream(sampler, prompt, max_new_tokens=6, rng=jax.random.key(3), effort=Effort(2)))
    assert got == list(want.tokens[0, : want.lengths[0]])
    assert sampler.think.close in got[:3]  # the budget of 2 forced the thought closed
