"""DeepSeek sparse attention against numpy: the indexer's top-k attention, its KL loss, the
detachment of the indexer, blocks of queries, cached decoding, and the decoding step's
O(S * k) compute."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_model
from jaxllm.config import AttentionConfig, SparseConfig
from jaxllm.nn import Attention, Mask, Transformer, attend
from jaxllm.nn.sparse import select, sparse_attention
from test_infer import cached_and_recomputed, random_variables

B, S, E, H, K, D, TOP_K = 2, 12, 16, 4, 2, 8, 4
# Row 0 packs two documents, so the first queries of each see fewer than TOP_K keys.
SEGMENTS = np.array([[1] * 7 + [2] * 5, [1] * S], np.int32)
POSITIONS = np.array([list(range(7)) + list(range(5)), list(range(S))], np.int32)


def layer(stage, query_block=256):
    sparse = SparseConfig(top_k=TOP_K, indexer_heads=3, indexer_head_dim=8, stage=stage,
                          query_block=query_block)
    return Attention(num_heads=H, num_kv_heads=K, head_dim=D, position="none", mask=Mask("sparse"),
                     sparse=sparse)


@functools.cache
def inputs():
    """Layer params and inputs drawn in numpy: (params, x [B, S, E], cotangent)."""
    shapes = nn.meta.unbox(jax.eval_shape(layer("sparse").init, jax.random.key(0),
                                          jnp.zeros((B, S, E)), POSITIONS, SEGMENTS)["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 0.4 * rng.standard_normal(s.shape).astype(np.float32),
                          shapes)
    x = rng.standard_normal((B, S, E)).astype(np.float32)
    return params, x, rng.standard_normal((B, S, E)).astype(np.float32)


def numpy_reference(params, x, stage):
    """float64: (the keys each query attends to [B, T, S], the indexer loss)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x, ip = x.astype(np.float64), p["indexer"]
    qi = np.einsum("bte,ehd->bthd", x, ip["query"]["kernel"])
    ki = np.einsum("bse,ed->bsd", x, ip["key"]["kernel"])
    w = np.einsum("bte,eh->bth", x, ip["weights"]["kernel"])
    scores = np.einsum("bth,bths->bts", w, np.maximum(np.einsum("bthd,bsd->bths", qi, ki), 0))
    idx = np.arange(S)
    visible = (idx[:, None] >= idx[None]) & (SEGMENTS[:, :, None] == SEGMENTS[:, None, :])
    scores = np.where(visible, scores, -np.inf)
    keep = visible.copy()
    if stage == "sparse":
        top = np.zeros_like(visible)
        np.put_along_axis(top, np.argsort(-scores, axis=-1)[..., :TOP_K], True, axis=-1)
        keep &= top
    q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"])
    k = np.repeat(np.einsum("bse,ekd->bskd", x, p["key"]["kernel"]), H // K, axis=2)
    logits = np.where(keep[:, None], np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D), -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    target = (probs / probs.sum(-1, keepdims=True)).sum(1)
    target /= target.sum(-1, keepdims=True)
    kept = np.where(keep, scores, -np.inf)
    top = kept.max(-1, keepdims=True)
    log_q = np.where(keep, kept - top - np.log(np.exp(kept - top).sum(-1, keepdims=True)), 0)
    kl = np.sum(target * (np.log(np.where(keep, target, 1)) - log_q), axis=-1)
    return keep, kl.mean()


def masked_attention(params, x, keep):
    """Plain softmax attention of the layer's q, k, v under the mask `keep` [B, T, S]."""
    q = jnp.einsum("bte,ehd->bthd", x, params["query"]["kernel"])
    k = jnp.repeat(jnp.einsum("bse,ekd->bskd", x, params["key"]["kernel"]), H // K, axis=2)
    v = jnp.repeat(jnp.einsum("bse,ekd->bskd", x, params["value"]["kernel"]), H // K, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * D**-0.5
    probs = jax.nn.softmax(jnp.where(keep[:, None], logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs, v)
    return jnp.einsum("bthd,hde->bte", out, params["out"]["kernel"])


@functools.cache
def layer_results(stage, query_block=256):
    """(output, grads of <output, cotangent>, indexer loss, its grads); grads w.r.t.
    (params, x)."""
    params, x, cotangent = inputs()
    model = layer(stage, query_block)

    def apply(p, x):
        out, sown = model.apply({"params": p}, x, POSITIONS, SEGMENTS,
                                mutable=["attention_metrics"])
        return out, sown["attention_metrics"]["indexer_loss"]

    def output(p, x):
        out = apply(p, x)[0]
        return jnp.sum(out * cotangent), out

    def loss(p, x):
        return apply(p, x)[1]

    (_, out), grads = jax.jit(jax.value_and_grad(output, (0, 1), has_aux=True))(params, x)
    value, loss_grads = jax.jit(jax.value_and_grad(loss, (0, 1)))(params, x)
    return out, grads, value, loss_grads


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_output_and_grads_equal_masked_attention_over_the_indexer_top_k(stage):
    params, x, cotangent = inputs()
    keep, _ = numpy_reference(params, x, stage)
    assert stage == "dense" or keep.sum(-1).max() == TOP_K < S
    out, (d_params, d_x) = layer_results(stage)[:2]

    def reference(p, x):
        y = masked_attention(p, x, keep)
        return jnp.sum(y * cotangent), y

    (_, want), (want_params, want_x) = jax.value_and_grad(reference, (0, 1), has_aux=True)(
        params, x)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_x, want_x, rtol=1e-5, atol=1e-5)
    for name in ("query", "key", "value", "out"):
        np.testing.assert_allclose(d_params[name]["kernel"], want_params[name]["kernel"],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_indexer_loss_equals_the_kl_to_the_head_summed_attention(stage):
    params, x, _ = inputs()
    _, want = numpy_reference(params, x, stage)
    np.testing.assert_allclose(layer_results(stage)[2], want, rtol=1e-5)


@pytest.mark.parametrize("query_block", [4, 5])
@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_blocks_of_queries_equal_one_block(stage, query_block):
    """S = 12 queries in 3 blocks of 4, or in blocks of 5 with the last one padded."""
    one = jax.tree.leaves(layer_results(stage))
    for got, want in zip(jax.tree.leaves(layer_results(stage, query_block)), one, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_the_indexer_is_detached_from_the_lm_and_trains_only_itself(stage):
    _, (lm_params, _), _, (loss_params, loss_x) = layer_results(stage)
    assert all(np.all(g == 0) for g in jax.tree.leaves(lm_params["indexer"]))
    assert np.all(loss_x == 0)
    for name in ("query", "key", "value", "out"):
        assert np.all(loss_params[name]["kernel"] == 0)
    assert all(np.any(g != 0) for g in jax.tree.leaves(loss_params["indexer"]))


def test_gradient_steps_on_the_indexer_loss_lower_it():
    params, x, _ = inputs()
    model = layer("dense")

    def loss(indexer):
        _, sown = model.apply({"params": {**params, "indexer": indexer}}, x, POSITIONS, SEGMENTS,
                              mutable=["attention_metrics"])
        return sown["attention_metrics"]["indexer_loss"]

    tx = optax.adam(1e-2)

    def descend(carry, _):
        indexer, opt_state = carry
        value, grad = jax.value_and_grad(loss)(indexer)
        updates, opt_state = tx.update(grad, opt_state)
        return (optax.apply_updates(indexer, updates), opt_state), value

    start = (params["indexer"], tx.init(params["indexer"]))
    _, losses = jax.jit(lambda c: jax.lax.scan(descend, c, length=30))(start)
    assert losses[-1] < 0.5 * losses[0], losses


def test_select_marks_the_slots_past_a_querys_visible_keys_invalid():
    scores = jnp.where(jnp.tril(jnp.ones((3, 3), bool)), jnp.arange(9.0).reshape(3, 3),
                       -jnp.inf)[None]
    indices, valid, _ = select(scores, 8)
    assert indices.shape == (1, 3, 3)
    np.testing.assert_array_equal(valid.sum(-1), [[1, 2, 3]])
    np.testing.assert_array_equal(indices[0, 2], [2, 1, 0])


def test_cached_decode_of_a_sparse_transformer_matches_full_recompute():
    sparse = SparseConfig(top_k=4, indexer_heads=2, indexer_head_dim=8)
    model = Transformer(tiny_model(attention=AttentionConfig(pattern="global,sparse",
                                                             sparse=sparse)))
    np.testing.assert_allclose(*cached_and_recomputed(model, random_variables(model)), atol=1e-5)


def flops(f, length, top_k=8):
    q = jax.ShapeDtypeStruct((1, length, H, D), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, K, D), jnp.float32)
    indices = jax.ShapeDtypeStruct((1, length, top_k), jnp.int32)
    valid = jax.ShapeDtypeStruct((1, length, top_k), jnp.bool_)
    return jax.jit(f).lower(q, kv, kv, indices, valid).compile().cost_analysis()["flops"]


def test_sparse_compute_grows_like_s_times_k_not_s_squared():
    def dense(q, k, v, indices, valid):
        idx = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        return attend(q, k, v, idx, jnp.ones_like(idx), idx, jnp.ones_like(idx))

    sparse_growth = flops(sparse_attention, 512) / flops(sparse_attention, 256)
    dense_growth = flops(dense, 512) / flops(dense, 256)
    assert 1.8 < sparse_growth < 2.2 and dense_growth > 3.5
