"""Multi-head Latent Attention against a per-head reference of the DeepSeek formulas (values
and gradients), YaRN's softmax scale, absorbed against naive decoding against full
recompute, the backend kernel and context parallelism, and the size of the latent cache."""

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_model
from jaxllm import Config, MeshConfig, calculator, parallel
from jaxllm.config import AttentionConfig, MLAConfig
from jaxllm.infer.cache import init_cache
from jaxllm.nn import Transformer
from jaxllm.nn.mla import MLAttention
from jaxllm.nn.positions import RopeScaling, rope_frequencies
from test_infer import cached_and_recomputed, random_variables

HEADS, EMBED, THETA = 4, 32, 10_000.0
MLA = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
YARN = RopeScaling("yarn", 4.0, original_max_len=4)
CASES = {  # (q_lora_rank, rope scaling)
    "direct_queries": (None, None),
    "query_latent": (8, None),
    "query_latent_yarn": (8, YARN),
}
# Two packed rows; positions restart in each document.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 3], [1, 1, 1, 1, 1, 2, 2, 2]], np.int32)
POSITIONS = np.array([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2]], np.int32)


def rms(x, scale, eps=1e-6):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def rotate(x, positions, freqs):
    """RoPE on [B, S, ..., R]: pair (i, i + R/2) turns by position * freqs[i]."""
    angles = positions.reshape(positions.shape + (1,) * (x.ndim - 3) + (1,)) * freqs
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([a * jnp.cos(angles) - b * jnp.sin(angles),
                            b * jnp.cos(angles) + a * jnp.sin(angles)], -1)


def reference(mla, p, x, positions, allowed, freqs, scale):
    """The REFERENCES formulas one head at a time, on MLAttention's parameters `p`."""
    k = {name: v["kernel"] for name, v in p.items() if "kernel" in v}
    if mla.q_lora_rank is None:
        q = jnp.einsum("bse,ehd->bshd", x, k["query"])
    else:
        c_q = rms(x @ k["query_down"], p["query_norm"]["scale"])
        q = jnp.einsum("bsc,chd->bshd", c_q, k["query_up"])
    nope, rank = mla.qk_nope_head_dim, mla.kv_lora_rank
    q_nope, q_rope = q[..., :nope], rotate(q[..., nope:], positions, freqs)
    down = x @ k["kv_down"]
    c_kv = rms(down[..., :rank], p["kv_norm"]["scale"])
    k_rope = rotate(down[..., rank:], positions, freqs)  # [B, S, R], shared by the heads
    out = 0.0
    for h in range(q.shape[2]):
        k_nope, v = c_kv @ k["key_up"][:, h], c_kv @ k["value_up"][:, h]
        scores = (jnp.einsum("btd,bsd->bts", q_nope[:, :, h], k_nope)
                  + jnp.einsum("btd,bsd->bts", q_rope[:, :, h], k_rope)) * scale
        probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
        out = out + probs @ v @ k["out"][h]
    return out


def numpy_mask(segments):
    """Causal within each packed document, [B, S, S]."""
    idx = np.arange(segments.shape[1])
    return (idx[:, None] >= idx[None, :]) & (segments[:, :, None] == segments[:, None, :])


def module(q_lora_rank, scaling, **kw):
    mla = MLAConfig(**{**MLA.__dict__, "q_lora_rank": q_lora_rank})
    return MLAttention(num_heads=HEADS, mla=mla, rope_theta=THETA, rope_scaling=scaling, **kw)


def random_params(model, seed=0):
    """Random params drawn in numpy: norm scales near 1, kernels near 0."""
    x = jnp.zeros((1, 8, EMBED))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, x[..., 0], x[..., 0])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = 0.3 * rng.standard_normal(leaf.shape).astype(np.float32)
        return noise + jax.tree_util.keystr(path).endswith("['scale']")

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes)["params"])


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*SEGMENTS.shape, EMBED)).astype(np.float32)
    return x, rng.standard_normal((*SEGMENTS.shape, EMBED)).astype(np.float32)


def value_and_grads(f, params, x, cotangent):
    """f(params, x) and its gradients w.r.t. both for the cotangent."""
    out, vjp = jax.vjp(f, params, x)
    return out, *vjp(cotangent)


@functools.partial(jax.jit, static_argnums=0)
def module_value_and_grads(model, params, x, cotangent, positions, segments):
    apply = lambda p, x: model.apply({"params": p}, x, positions, segments)
    return value_and_grads(apply, params, x, cotangent)


@functools.partial(jax.jit, static_argnums=0)
def reference_value_and_grads(mla, params, x, cotangent, freqs, scale):
    f = lambda p, x: reference(mla, p, x, POSITIONS, numpy_mask(SEGMENTS), freqs, scale)
    return value_and_grads(f, params, x, cotangent)


def run_case(name, scale=None):
    """(module's, reference's) value and gradients for CASES[name]; the reference at
    `scale`, by default (nope + rope) ** -0.5."""
    q_lora_rank, scaling = CASES[name]
    model = module(q_lora_rank, scaling)
    params, (x, cotangent) = random_params(model), inputs()
    dim = MLA.qk_nope_head_dim + MLA.qk_rope_head_dim
    freqs = rope_frequencies(MLA.qk_rope_head_dim, THETA, scaling)
    got = module_value_and_grads(model, params, x, cotangent, POSITIONS, SEGMENTS)
    want = reference_value_and_grads(model.mla, params, x, cotangent, freqs,
                                     dim**-0.5 if scale is None else scale)
    return got, want


def assert_trees_close(got, want, tol=1e-5):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", ["direct_queries", "query_latent"])
def test_mla_values_and_gradients_equal_the_per_head_reference(name):
    got, want = run_case(name)
    assert_trees_close(got, want)


def test_yarn_multiplies_the_softmax_scale_by_mscale_squared():
    dim = MLA.qk_nope_head_dim + MLA.qk_rope_head_dim
    mscale = 0.1 * math.log(YARN.factor) + 1
    got, want = run_case("query_latent_yarn", dim**-0.5 * mscale**2)
    assert_trees_close(got, want)
    _, plain = run_case("query_latent_yarn")
    assert np.abs(got[0] - plain[0]).max() > 1e-2


@pytest.mark.parametrize("kernel", ["backend", "ring"])
def test_backend_kernel_and_context_parallelism_equal_the_naive_kernel(kernel):
    """The backend kernel and the ring take v zero-padded to k's width; the ring runs on a
    mesh with context=2."""
    model = module(8, None, kernel="naive" if kernel == "ring" else kernel, block_size=4)
    params, (x, cotangent) = random_params(model), inputs()
    want = module_value_and_grads(model.clone(kernel="naive"), params, x, cotangent,
                                  POSITIONS, SEGMENTS)
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(context=2)), jax.devices()[:2])
    with parallel.use_mesh(mesh) if kernel == "ring" else contextlib.nullcontext():
        got = module_value_and_grads(model, params, x, cotangent, POSITIONS, SEGMENTS)
    assert_trees_close(got, want)


def mla_model(absorb=True, **overrides):
    """Two MLA layers, scanned as one group: global RoPE, then sliding NoPE."""
    mla = MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, absorb=absorb)
    attention = AttentionConfig(pattern="global,sliding", positions="rope,none", window=3,
                                mla=mla)
    return tiny_model(num_kv_heads=8, attention=attention, **overrides)


def test_absorbed_and_naive_decode_match_full_recompute_at_every_step():
    cached = {}
    for absorb in (True, False):
        model = Transformer(mla_model(absorb))
        cached[absorb], want = cached_and_recomputed(model, random_variables(model))
        np.testing.assert_allclose(cached[absorb], want, atol=1e-5, err_msg=f"absorb={absorb}")
    np.testing.assert_allclose(cached[True], cached[False], atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_holds_only_the_latent_and_the_rope_key(dtype):
    cfg = mla_model(dtype=dtype)
    mla, batch, length = cfg.attention.mla, 2, 5
    want = (mla.kv_lora_rank + mla.qk_rope_head_dim) * jnp.dtype(dtype).itemsize
    cache = jax.tree_util.tree_leaves_with_path(init_cache(Transformer(cfg), batch, length))
    names = {path[-1].key for path, _ in cache}
    assert names == {"cached_latent", "cached_rope_key", "cache_index"}
    total = sum(x.nbytes for path, x in cache if path[-1].key != "cache_index")
    assert total == want * cfg.num_layers * batch * length
    assert calculator.kv_cache_bytes_per_token(cfg) == want * cfg.num_layers
