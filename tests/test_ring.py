"""Ring and all-gather context parallelism against naive full attention; token orders; balance;
the model and its data path under a context-parallel mesh against one device."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import init_params, tiny_model

from jaxllm import Config, MeshConfig, parallel
from jaxllm.data import ArithmeticSource
from jaxllm.nn import Transformer
from jaxllm.nn.context_order import from_context_order, permutation, to_context_order
from jaxllm.nn.ring import active_blocks, all_gather_attention, ring_attention
from jaxllm.train.loop import context_ordered
from jaxllm.train.step import cross_entropy

HEADS, DIM = 4, 8


def reference_attention(q, k, v, positions, segment_ids, causal, window):
    """Softmax over every key, with the mask written out from true positions and segments."""
    qi, kj = positions[:, :, None], positions[:, None, :]
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        mask &= kj <= qi
    if window is not None:
        mask &= (qi - kj < window) if causal else (jnp.abs(qi - kj) < window)
    k, v = (jnp.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


def make_inputs(batch, length, kv_heads, segments):
    """q, k, v, a cotangent, and positions restarting at each packed segment."""
    rng = np.random.default_rng(length + kv_heads)
    q, k, v, cotangent = (
        jnp.asarray(rng.standard_normal(shape, np.float32))
        for shape in [(batch, length, HEADS, DIM)] + [(batch, length, kv_heads, DIM)] * 2
        + [(batch, length, HEADS, DIM)]
    )
    index = np.broadcast_to(np.arange(length), (batch, length))
    # Row b is cut into documents at 5 + 3b, 19 and 2/3 of the length.
    cuts = np.array([[5 + 3 * b, 19, 2 * length // 3] for b in range(batch)])
    seg = (index[:, :, None] >= cuts[:, None, :]).sum(-1) if segments else np.zeros_like(index)
    starts = np.concatenate([np.zeros((batch, 1), int), cuts], axis=1)
    pos = index - np.take_along_axis(starts, seg, axis=1)
    return q, k, v, cotangent, jnp.asarray(pos), jnp.asarray(seg)


def context_mesh(n, **axes):
    """A mesh with n devices on `context` and the given sizes of the other axes."""
    sizes = {"data": 1, **axes, "context": n}
    config = Config(mesh=MeshConfig(**sizes))
    return parallel.make_mesh(config, devices=jax.devices()[: math.prod(sizes.values())])


def value_and_grads(attention, q, k, v, cotangent):
    """attention(q, k, v) and its vjp for the cotangent, in one compiled program."""

    @jax.jit
    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(cotangent)

    return run(q, k, v, cotangent)


def check_against_reference(kernel, n, order, *, mesh_axes=None, batch=1, length=32, kv_heads=2,
                            causal=True, segments=False, window=None, **options):
    q, k, v, cotangent, pos, seg = make_inputs(batch, length, kv_heads, segments)
    perm = permutation(order, length, n)
    mesh = context_mesh(n, **(mesh_axes or {}))

    def parallel_attention(q, k, v):
        q, k, v, p, s = to_context_order((q, k, v, pos, seg), perm)
        out = kernel(q, k, v, p, s, causal=causal, window=window, mesh=mesh, **options)
        return from_context_order(out, perm)

    want = value_and_grads(
        lambda q, k, v: reference_attention(q, k, v, pos, seg, causal, window), q, k, v, cotangent)
    got = value_and_grads(parallel_attention, q, k, v, cotangent)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (want[0], *want[1])):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize(
    "n, order, options",
    [
        (2, "plain", {"kv_heads": 4}),
        (4, "zigzag", {"segments": True}),
        (8, "striped", {"kv_heads": 1, "window": 6}),
        (4, "striped", {"causal": False, "segments": True, "window": 9}),
        (8, "zigzag", {"segments": True, "window": 7, "custom_vjp": False}),
        (2, "zigzag", {"causal": False, "batch": 2, "chunks": 1}),
        (2, "plain", {"mesh_axes": {"data": 2, "tensor": 2}, "batch": 2, "segments": True}),
    ],
    ids=["n2-plain-mha", "n4-zigzag-gqa-segments", "n8-striped-mqa-window",
         "n4-striped-noncausal-segments-window", "n8-zigzag-autodiff-segments-window",
         "n2-zigzag-noncausal-chunks1", "data2xtensor2xn2-plain-segments"],
)
def test_ring_attention_matches_full_attention(n, order, options):
    check_against_reference(ring_attention, n, order, **options)


@pytest.mark.parametrize(
    "n, order, options",
    [
        (4, "zigzag", {"segments": True}),
        (8, "plain", {"causal": False, "kv_heads": 1, "window": 5}),
    ],
    ids=["n4-zigzag-segments", "n8-plain-noncausal-mqa-window"],
)
def test_all_gather_attention_matches_full_attention(n, order, options):
    check_against_reference(all_gather_attention, n, order, **options)


@pytest.mark.parametrize("n", [4, 8])
def test_zigzag_balances_causal_blocks(n):
    length = 8 * n
    positions, segment_ids = np.arange(length)[None], np.zeros((1, length), int)

    def counts(order):
        perm = permutation(order, length, n)
        return active_blocks(positions[:, perm], segment_ids[:, perm], n)

    # Plain: device r skips the later devices' blocks, and half its own diagonal block.
    np.testing.assert_array_equal(counts("plain"), 4 * np.arange(n) + 3)
    # Zigzag: 2n + 1 chunk pairs on every device, half the plain ring's critical path.
    np.testing.assert_array_equal(counts("zigzag"), np.full(n, 2 * n + 1))
    # Striped: every step skips the pair of early queries and late keys, on every device.
    np.testing.assert_array_equal(counts("striped"), np.full(n, 3 * n))


def test_orders_match_the_documented_layouts_and_invert():
    np.testing.assert_array_equal(permutation("zigzag", 8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
    np.testing.assert_array_equal(permutation("striped", 8, 2), [0, 2, 4, 6, 1, 3, 5, 7])
    x = jnp.arange(2 * 24 * 3).reshape(2, 24, 3)
    for order in ("plain", "zigzag", "striped"):
        perm = permutation(order, 24, 3)
        np.testing.assert_array_equal(to_context_order(x, perm)[:, :, 0], x[:, perm, 0])
        np.testing.assert_array_equal(from_context_order(to_context_order(x, perm), perm), x)


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="zigzag order: sequence length 12 is not a multiple of 8"):
        permutation("zigzag", 12, 4)
    q, k, v, _, pos, seg = make_inputs(1, 24, 2, False)
    mesh = context_mesh(4)
    with pytest.raises(ValueError, match="sequence length 24 must be a multiple of 16"):
        ring_attention(q, k, v, pos, seg, mesh=mesh, chunks=4)
    with pytest.raises(ValueError, match="kv heads 3 must divide query heads 4"):
        ring_attention(q, q[:, :, :3], q[:, :, :3], pos, seg, mesh=mesh)
    with pytest.raises(ValueError, match="segment_ids must be"):
        ring_attention(q, k, v, pos, seg[:, :8], mesh=mesh)
    with pytest.raises(ValueError, match="needs a mesh with a 'context' axis"):
        ring_attention(q, k, v, pos, seg)


def test_ring_memory_stays_per_step_under_a_layer_scan():
    """Inside a scan over layers, as in the model, the fwd+bwd keeps the temp memory of one
    call: the n steps' masks, which depend only on loop-invariant positions, are not
    materialized all at once."""
    mesh = context_mesh(8)
    q, k, v, _, pos, seg = make_inputs(1, 2048, 1, False)

    def one(q):
        return ring_attention(q, k, v, pos, seg, mesh=mesh).sum()

    def layers(q):
        step = lambda x, _: (x + ring_attention(x, k, v, pos, seg, mesh=mesh), None)
        return jax.lax.scan(step, q, length=2)[0].sum()

    def temp_bytes(loss):
        compiled = jax.jit(jax.grad(loss)).lower(q).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(layers) < 1.5 * temp_bytes(one)


@pytest.mark.parametrize("kernel", ["ring", "all_gather"])
def test_model_under_context_parallelism_matches_one_device(kernel):
    """data=2 x context=4 in zigzag order, through the loop's data path: the tiny model's mean
    token loss and its gradients equal those of full attention on the original order. The
    order is only right if attention masks by true positions, so the test also fails if the
    model does not route to ring attention."""
    model = Transformer(tiny_model(context_parallel=kernel))
    params = init_params(model)
    batch = next(ArithmeticSource(0).batches(2, 32))  # packed documents

    def loss(params, batch):
        logits = model.apply(
            {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
        nll, _, tokens = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return nll / tokens

    want_loss, want_grads = jax.jit(jax.value_and_grad(loss))(params, batch)
    mesh = context_mesh(4, data=2)
    (ordered,) = context_ordered([batch], mesh, "zigzag")
    assert not np.array_equal(ordered["positions"], batch["positions"])
    with parallel.use_mesh(mesh):
        ordered = jax.device_put(ordered, parallel.batch_sharding(mesh))
        got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(params, ordered)
    np.testing.assert_allclose(got_loss, want_loss, atol=1e-5, rtol=0)
    named = jax.tree_util.tree_leaves_with_path(got_grads)
    for (path, got), want in zip(named, jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))
