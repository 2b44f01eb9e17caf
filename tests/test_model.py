"""The dense decoder against naive references: causality, heads, RoPE, scan, segments."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import arithmetic_batch, init_params, tiny_model
from jaxllm.nn import Attention, Transformer, apply_rope


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = Transformer(tiny_model())
    params = init_params(model)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 384)
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 384)
    before = jax.jit(model.apply)({"params": params}, tokens)
    after = jax.jit(model.apply)({"params": params}, changed)
    np.testing.assert_array_equal(before[:, :10], after[:, :10])
    assert not np.allclose(before[:, 10:], after[:, 10:])


def naive_mha(params, x, positions, num_heads, head_dim, theta):
    """Multi-head attention head by head, with keys and values repeated per query head."""
    q = jnp.einsum("bse,ehd->bshd", x, params["query"]["kernel"])
    k = jnp.einsum("bse,ehd->bshd", x, params["key"]["kernel"])
    v = jnp.einsum("bse,ehd->bshd", x, params["value"]["kernel"])
    q, k = apply_rope(q, positions, theta), apply_rope(k, positions, theta)
    repeat = num_heads // k.shape[2]
    k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    length = x.shape[1]
    causal = np.tril(np.ones((length, length), bool))
    heads = []
    for h in range(num_heads):
        scores = q[:, :, h] @ k[:, :, h].transpose(0, 2, 1) / np.sqrt(head_dim)
        scores = jnp.where(causal, scores, -jnp.inf)
        heads.append(jax.nn.softmax(scores, axis=-1) @ v[:, :, h])
    out = jnp.stack(heads, axis=2)
    return jnp.einsum("bshd,hde->bse", out, params["out"]["kernel"])


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_matches_naive_multi_head_attention(num_kv_heads):
    attention = Attention(num_heads=4, num_kv_heads=num_kv_heads, head_dim=8, rope_theta=500.0)
    x = jax.random.normal(jax.random.key(0), (2, 12, 32))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    segments = jnp.ones((2, 12), jnp.int32)
    params = jax.tree.map(
        lambda p: p.unbox() if hasattr(p, "unbox") else p,
        attention.init(jax.random.key(1), x, positions, segments)["params"],
        is_leaf=lambda p: hasattr(p, "unbox"),
    )
    got = jax.jit(attention.apply)({"params": params}, x, positions, segments)
    want = jax.jit(naive_mha, static_argnums=(3, 4, 5))(params, x, positions, 4, 8, 500.0)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    # The kernel's hand-written backward against autodiff of the naive reference.
    weights = jax.random.normal(jax.random.key(2), got.shape)
    got_grads = jax.grad(
        lambda p, x: jnp.sum(attention.apply({"params": p}, x, positions, segments) * weights),
        argnums=(0, 1),
    )(params, x)
    want_grads = jax.grad(
        lambda p, x: jnp.sum(naive_mha(p, x, positions, 4, 8, 500.0) * weights), argnums=(0, 1)
    )(params, x)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5), got_grads, want_grads
    )


def test_gqa_with_as_many_kv_heads_as_heads_is_mha():
    """The grouped path with K == H must equal MHA computed without grouping."""
    mha = Attention(num_heads=4, num_kv_heads=4, head_dim=8)
    x = jax.random.normal(jax.random.key(0), (1, 6, 32))
    positions = jnp.arange(6)[None]
    segments = jnp.ones((1, 6), jnp.int32)
    variables = mha.init(jax.random.key(1), x, positions, segments)
    got = jax.jit(mha.apply)(variables, x, positions, segments)
    params = jax.tree.map(lambda p: p.unbox(), variables["params"], is_leaf=lambda p: hasattr(p, "unbox"))
    np.testing.assert_allclose(got, naive_mha(params, x, positions, 4, 8, 10_000.0), atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 5, 2, 16))
    k = jax.random.normal(jax.random.key(1), (1, 5, 2, 16))
    positions = jnp.arange(5)[None]

    def scores(shift):
        rq = apply_rope(q, positions + shift, 10_000.0)
        rk = apply_rope(k, positions + shift, 10_000.0)
        return jnp.einsum("bthd,bshd->bhts", rq, rk)

    np.testing.assert_allclose(scores(0), scores(37), atol=1e-4)
    np.testing.assert_allclose(scores(0), scores(1000), atol=1e-3)
    # and RoPE does rotate: unrotated scores differ
    assert not np.allclose(scores(0), jnp.einsum("bthd,bshd->bhts", q, k), atol=1e-2)


def unstack_layers(params, num_layers):
    """Scanned params (leading layer axis) -> the unrolled layout layers_0 ... layers_{L-1}."""
    decoder = params["decoder"]
    unrolled = {
        f"layers_{i}": jax.tree.map(lambda x: x[i], decoder["layers"]) for i in range(num_layers)
    }
    return {**params, "decoder": unrolled}


def test_scanned_and_unrolled_layers_are_identical():
    cfg = tiny_model(num_layers=3)
    scanned = Transformer(cfg)
    unrolled = Transformer(dataclasses.replace(cfg, scan_layers=False))
    params = init_params(scanned)
    batch = arithmetic_batch(2, 32)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    want = jax.jit(scanned.apply)({"params": params}, *args)
    got = jax.jit(unrolled.apply)({"params": unstack_layers(params, 3)}, *args)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    init_tree = jax.tree.structure(init_params(unrolled))
    assert jax.tree.structure(unstack_layers(params, 3)) == init_tree


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_policies_keep_values_and_gradients(remat):
    batch = arithmetic_batch(2, 32)
    base = Transformer(tiny_model())
    params = init_params(base)

    def loss(model, p):
        args = (batch["inputs"], batch["positions"], batch["segment_ids"])
        logits = model.apply({"params": p}, *args)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    want, want_grads = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(base, params)
    got, got_grads = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(
        Transformer(tiny_model(remat=remat)), params
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_grads, want_grads)


def test_packed_documents_never_attend_across_boundaries():
    """A document's logits are the same alone as when packed after another document."""
    model = Transformer(tiny_model())
    params = init_params(model)
    first = jax.random.randint(jax.random.key(0), (7,), 0, 256)
    second = jax.random.randint(jax.random.key(1), (9,), 0, 256)
    packed = jnp.concatenate([first, second])[None]
    positions = jnp.concatenate([jnp.arange(7), jnp.arange(9)])[None]
    segments = jnp.array([[1] * 7 + [2] * 9])
    packed_logits = jax.jit(model.apply)({"params": params}, packed, positions, segments)
    alone = jax.jit(model.apply)({"params": params}, second[None])
    np.testing.assert_allclose(packed_logits[:, 7:], alone, atol=1e-5, rtol=1e-5)


def test_tied_head_reuses_the_embedding_and_bfloat16_compute_tracks_float32():
    cfg = tiny_model(tie_embeddings=True)
    params = init_params(Transformer(cfg))
    assert "head" not in params
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 384)
    f32 = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)
    bf16 = jax.jit(Transformer(dataclasses.replace(cfg, dtype="bfloat16")).apply)({"params": params}, tokens)
    assert bf16.dtype == jnp.bfloat16
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    np.testing.assert_allclose(bf16.astype(jnp.float32), f32, atol=0.15)
