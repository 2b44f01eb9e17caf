"""FP8 matmuls (`jaxllm.nn.fp8`): quantisation error bounds, matmuls and gradients against
float32, the einsum layout, delayed scaling's history, the experts, config checks, and
training and resuming with fp8."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import arithmetic_batch, dense_loss_sums, init_params, tiny_model
from jaxllm import Config, DataConfig, MeshConfig, TrainConfig, parallel
from jaxllm.config import ConfigError, MoEConfig
from jaxllm.nn import experts, fp8
from jaxllm.nn.transformer import Transformer
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.loop import pretrain
from jaxllm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxllm.train.state import init_state
from jaxllm.train.step import lm_loss, train_step
from runs import compilation_cache, losses, quiet, run_config

BLOCK = 32
NO_HISTORY = jnp.zeros((3, 0), jnp.float32)
# Round to nearest with 3 mantissa bits errs by at most 2^-4 of |x| in e4m3's normal range;
# below it (scaled |x| < 2^-6) the subnormal spacing 2^-9 bounds the error by 2^-10 of the
# scaled unit, i.e. 2^-10 * amax / 448 (2^-3 and 2^-17 * amax / 57344 for e5m2).
BOUNDS = {fp8.E4M3: (2**-4, 2**-10), fp8.E5M2: (2**-3, 2**-17)}
# Relative Frobenius error of y = x @ w on normal inputs: each e4m3 operand errs by an rms
# of about 2^-4 / sqrt(3) * 0.72 = 0.026, so y by sqrt(2) times that, 0.037; gradients with
# an e5m2 operand by about 0.06.
FORWARD_TOL, GRAD_TOL = {"tensorwise": 0.05, "blockwise": 0.05}, {"tensorwise": 0.08,
                                                                  "blockwise": 0.05}
# A whole model's gradient passes through a chain of fp8 matmuls per layer.
MODEL_GRAD_TOL = 0.1


def rel_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def heavy_tailed(shape, seed=0) -> np.ndarray:
    """Student-t (2 degrees of freedom) values: occasional entries hundreds of times the rest."""
    return np.random.default_rng(seed).standard_t(2, shape).astype(np.float32)


def tile_amax(x: np.ndarray, tile) -> np.ndarray:
    """Each element's tile amax, by a loop over the tiles."""
    rows, cols = (n if t is None else t for n, t in zip(x.shape, tile))
    out = np.zeros_like(x)
    for r in range(0, x.shape[0], rows):
        for c in range(0, x.shape[1], cols):
            out[r:r + rows, c:c + cols] = np.abs(x[r:r + rows, c:c + cols]).max()
    return out


@pytest.mark.parametrize("tile", [(None, None), (1, BLOCK), (BLOCK, BLOCK), (BLOCK, 1)])
@pytest.mark.parametrize("fmt", [fp8.E4M3, fp8.E5M2])
def test_round_trip_error_stays_within_the_format_bound_per_tile(tile, fmt):
    x = heavy_tailed((96, 80))  # 80 columns: ragged last tiles of 32
    q, scale = fp8.quantise(jnp.asarray(x), tile, fmt)
    amax = tile_amax(x, tile)
    assert q.dtype == fmt
    back = np.asarray(fp8.dequantise(q, scale, tile, jnp.float32))
    relative, absolute = BOUNDS[fmt]
    bound = np.maximum(relative * np.abs(x), absolute * amax / fp8.fmt_max(fmt))
    assert np.all(np.abs(back - x) <= bound * (1 + 1e-6))
    assert np.abs(back - x).max() > 0  # the bound is not vacuous: fp8 does round


def test_scales_are_format_max_over_tile_amax():
    x = heavy_tailed((64, 64))
    _, scale = fp8.quantise(jnp.asarray(x), (1, BLOCK), fp8.E4M3)
    want = 448.0 / np.abs(x.reshape(64, 2, BLOCK)).max(-1)
    np.testing.assert_allclose(np.asarray(scale), want, rtol=1e-6)


def test_a_delayed_amax_below_the_tensor_saturates_at_the_format_max():
    x = jnp.asarray([[1.0, -4.0, 0.5]])
    back = fp8.qdq(x, (None, None), fp8.E4M3, amax=jnp.float32(2.0))
    np.testing.assert_allclose(np.asarray(back), [[1.0, -2.0, 0.5]])


def matmul_and_grads(x, w, cotangent, r: fp8.Recipe | None):
    """(y, dx, dw) of sum(x @ w * cotangent), in fp8 with recipe `r` or in float32."""
    def f(a, b):
        y = a @ b if r is None else fp8.matmul(a, b, NO_HISTORY, r)
        return jnp.sum(y * cotangent), y

    grad = jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))
    (dx, dw), y = grad(jnp.asarray(x), jnp.asarray(w))
    return y, dx, dw


@pytest.mark.parametrize("kind", ["tensorwise", "blockwise"])
@pytest.mark.parametrize("inputs", ["normal", "heavy_tailed"])
def test_matmul_and_its_gradients_stay_close_to_float32(kind, inputs):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((128, 96)) if inputs == "normal" else heavy_tailed((128, 96))
    w = rng.standard_normal((96, 64)) / 10
    cotangent = rng.standard_normal((128, 64)).astype(np.float32)
    want = matmul_and_grads(x.astype(np.float32), w.astype(np.float32), cotangent, None)
    got = matmul_and_grads(x.astype(np.float32), w.astype(np.float32), cotangent,
                           fp8.Recipe(kind, BLOCK))
    assert rel_error(got[0], want[0]) < FORWARD_TOL[kind]
    assert rel_error(got[1], want[1]) < GRAD_TOL[kind]
    assert rel_error(got[2], want[2]) < GRAD_TOL[kind]


def test_blockwise_beats_tensorwise_with_outlier_tokens():
    """Rows 10^4 times larger (massive activations) push a shared scale's other rows into
    e4m3's subnormals; per-row tiles keep them at full precision."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    x[::64] *= 1e4
    w = (rng.standard_normal((128, 64)) / 10).astype(np.float32)
    want = x @ w

    def mean_row_error(kind):
        y = np.asarray(fp8.matmul(jnp.asarray(x), jnp.asarray(w), NO_HISTORY,
                                  fp8.Recipe(kind, BLOCK)))
        return np.mean(np.linalg.norm(y - want, axis=1) / np.linalg.norm(want, axis=1))

    blockwise, tensorwise = mean_row_error("blockwise"), mean_row_error("tensorwise")
    assert blockwise < FORWARD_TOL["blockwise"]
    assert blockwise < 0.8 * tensorwise


def test_tensorwise_history_scales_by_its_max_and_shifts_in_the_new_amaxes():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((16, 32)), rng.standard_normal((32, 8))
    x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    history = jnp.asarray([[8.0, 2.0, 0.0], [1.0, 0.5, 0.0], [4.0, 3.0, 0.0]])
    r = fp8.Recipe("tensorwise", history=3)

    def f(a, b, h):
        return jnp.sum(fp8.matmul(a, b, h, r) * cotangent)

    _, _, next_history = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, w, history)
    amaxes = [jnp.abs(x).max(), jnp.abs(w).max(), jnp.abs(cotangent).max()]
    want = np.concatenate([np.asarray(amaxes)[:, None], np.asarray(history)[:, :2]], axis=1)
    np.testing.assert_allclose(np.asarray(next_history), want, rtol=1e-6)
    # The forward pass used amax 8 for x and 1 for w (w saturates), not their own amaxes.
    expected = fp8.qdq(x, (None, None), fp8.E4M3, jnp.float32(8.0)) @ fp8.qdq(
        w, (None, None), fp8.E4M3, jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(fp8.matmul(x, w, history, r)), np.asarray(expected),
                               rtol=1e-6)


@pytest.mark.parametrize("equation, x_shape, k_shape", [
    ("bse,egf->bsgf", (2, 8, 64), (64, 2, 32)),
    ("bshd,hde->bse", (2, 8, 4, 16), (4, 16, 64)),
    ("bsc,chd->bshd", (2, 8, 32), (32, 4, 16)),
])
def test_einsum_is_the_matmul_of_the_flattened_axes(equation, x_shape, k_shape):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
    r = fp8.Recipe("blockwise", BLOCK)
    got = fp8.einsum(equation, x, kernel, NO_HISTORY, r)
    assert fp8.is_matmul(equation)
    assert rel_error(got, jnp.einsum(equation, x, kernel)) < FORWARD_TOL["blockwise"]
    # Exactly the fp8 matmul of the operands laid out by hand as [M, K] @ [K, N].
    if equation == "bshd,hde->bse":
        flat = fp8.matmul(x.reshape(16, 64), kernel.reshape(64, 64), NO_HISTORY, r)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(flat).reshape(2, 8, 64))
    assert not fp8.is_matmul("bthd,chd->bthc")  # absorbed MLA decoding keeps the compute dtype


def model_grads(fp8_kind: str) -> np.ndarray:
    """All parameters' gradients of a one-layer tiny model's loss, as one vector."""
    model = Transformer(tiny_model(num_layers=1, fp8=fp8_kind, fp8_block_size=BLOCK))
    batch = arithmetic_batch(8, 32)
    grads = jax.jit(jax.grad(lambda p: dense_loss_sums(p, batch, model, 0.0)[0]))(
        init_params(model))
    return np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])


@pytest.fixture(scope="module")
def float32_grads() -> np.ndarray:
    return model_grads("none")


@pytest.mark.parametrize("kind", ["tensorwise", "blockwise"])
def test_the_train_steps_gradients_stay_close_to_float32(kind, float32_grads):
    assert rel_error(model_grads(kind), float32_grads) < MODEL_GRAD_TOL


def test_accumulated_micro_batches_keep_the_largest_amaxes():
    """A step over 2 micro-batches (rows 0, 2, ... and 1, 3, ...) leaves the elementwise max
    of the histories that one-micro-batch steps on each half leave."""
    config = Config(model=tiny_model(num_layers=1, fp8="tensorwise", fp8_history=3),
                    mesh=MeshConfig(data=1))
    model = Transformer(config.model)
    mesh = parallel.make_mesh(config, jax.devices()[:1])
    batch = arithmetic_batch(8, 32)

    def next_meta(batch, grad_accum):
        cfg = TrainConfig(batch_size=batch["inputs"].shape[0], seq_len=32, grad_accum=grad_accum)
        tx = make_optimizer(cfg)
        state, _ = init_state(model, tx, 32, mesh, jax.random.key(0))
        step = functools.partial(train_step, model=model, tx=tx, cfg=cfg,
                                 schedule=learning_rate_schedule(cfg),
                                 loss=functools.partial(lm_loss, model=model, z_loss=0.0))
        with parallel.use_mesh(mesh):
            return jax.tree.leaves(jax.jit(step)(state, batch)[0].fp8_meta)

    halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in (0, 1)]
    first, second = (next_meta(h, 1) for h in halves)
    want = [np.maximum(a, b) for a, b in zip(first, second)]
    for half in (first, second):  # neither half's history passes for the max
        assert not all(np.array_equal(w, h) for w, h in zip(want, half))
    got = next_meta(batch, 2)
    assert len(got) == 6 and all(np.all(np.asarray(g)[..., 0] > 0) for g in got)  # [L, 3, H]
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5)


def route(tokens=32, num_experts=4, k=2, embed=64, hidden=32, seed=5):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((tokens, embed)), jnp.float32)
    ids = jnp.asarray(np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :k], jnp.int32)
    weights = jnp.asarray(rng.random((tokens, k)), jnp.float32)
    wi = jnp.asarray(rng.standard_normal((num_experts, embed, 2, hidden)) / 8, jnp.float32)
    wo = jnp.asarray(rng.standard_normal((num_experts, hidden, embed)) / 6, jnp.float32)
    return x, weights, ids, wi, wo


@pytest.mark.parametrize("kernel", ["block_sparse", "sorted_einsum"])
def test_fp8_experts_stay_close_to_the_float32_experts(kernel):
    """Against float32 sorted_einsum experts (dropless with capacity T)."""
    x, weights, ids, wi, wo = route()
    cotangent = jnp.asarray(np.random.default_rng(6).standard_normal(x.shape), jnp.float32)

    def loss(x, wi, wo, kernel, recipe):
        y, _ = experts.routed_experts(x, weights, ids, wi, wo, capacity=x.shape[0],
                                      kernel=kernel, fp8=recipe)
        return jnp.sum(y * cotangent), y

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=(3, 4))
    want_grads, want = grad(x, wi, wo, "sorted_einsum", None)
    got_grads, got = grad(x, wi, wo, kernel, fp8.Recipe("blockwise", BLOCK))
    assert rel_error(got, want) < 2 * FORWARD_TOL["blockwise"]  # two matmuls in a row
    for g, w in zip(got_grads, want_grads):
        assert rel_error(g, w) < 2 * GRAD_TOL["blockwise"]


def test_auto_experts_under_fp8_are_block_sparse():
    x, weights, ids, wi, wo = route()
    run = jax.jit(experts.routed_experts, static_argnames=("capacity", "kernel", "fp8"))
    auto, block_sparse = (run(x, weights, ids, wi, wo, capacity=32, kernel=k,
                              fp8=fp8.Recipe("blockwise", BLOCK))[0]
                          for k in ("auto", "block_sparse"))
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(block_sparse))


def test_experts_kernels_without_fp8_refuse_a_recipe():
    x, weights, ids, wi, wo = route()
    with pytest.raises(ValueError, match="tiled experts kernel takes no fp8"):
        experts.routed_experts(x, weights, ids, wi, wo, capacity=32, kernel="tiled",
                               fp8=fp8.Recipe("blockwise", BLOCK))


@pytest.mark.parametrize("model, field", [
    (dict(fp8="blockwise", fp8_block_size=128), "model.embed_dim"),
    (dict(fp8="blockwise", fp8_block_size=64, mlp_dim=96), "model.mlp_dim"),
    (dict(fp8="blockwise", fp8_block_size=32, moe=MoEConfig(expert_dim=48)),
     "model.moe.expert_dim"),
    (dict(fp8="tensorwise", moe=MoEConfig(kernel="gmm")), "model.moe.kernel"),
    (dict(fp8="tensorwise", fp8_history=0), "model.fp8_history"),
    (dict(fp8="blockwise", fp8_block_size=0), "model.fp8_block_size"),
])
def test_config_errors_name_the_field(model, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        tiny_model(**model).validate("model.")


def test_fp8_configs_that_fit_validate():
    tiny_model(fp8="blockwise", fp8_block_size=64).validate("model.")
    tiny_model(fp8="tensorwise", moe=MoEConfig(expert_dim=48)).validate("model.")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    with compilation_cache(tmp_path_factory.getbasetemp() / "xla_cache") as env:
        yield env


def fp8_run(workdir, **train):
    config = run_config(workdir, **train)
    return dataclasses.replace(config, model=dataclasses.replace(
        config.model, fp8="tensorwise", fp8_history=4))


@pytest.mark.slow
def test_amax_history_is_saved_and_restored_with_the_checkpoint(tmp_path, cache_env):
    reference = losses(pretrain(fp8_run(tmp_path / "reference"), log=quiet))
    workdir = tmp_path / "resumed"
    first = losses(pretrain(fp8_run(workdir), log=quiet, stop_after=3))
    checkpointer = Checkpointer(workdir / "checkpoints", fp8_run(workdir).checkpoint)
    try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        saved = checkpointer.manager.restore(3, args=args).state["fp8_meta"]
    finally:
        checkpointer.close()
    (history,) = jax.tree.leaves(saved["decoder"]["layers"]["mlp"]["wi"])
    history = np.asarray(history)  # [layers, 3, 4]: three steps pushed, newest first
    assert history.shape == (2, 3, 4)
    assert np.all(history[..., :3] > 0) and np.all(history[..., 3] == 0)
    second = losses(pretrain(fp8_run(workdir), log=quiet))
    assert first + second == reference  # a reset history would scale differently


@pytest.mark.slow
def test_blockwise_training_matches_bfloat16_within_two_percent(tmp_path):
    def final_loss(fp8_kind: str) -> float:
        config = Config(
            model=tiny_model(dtype="bfloat16", fp8=fp8_kind, fp8_block_size=BLOCK),
            data=DataConfig(source="arithmetic"),
            train=TrainConfig(steps=120, batch_size=8, seq_len=32, log_every=10, eval_every=0,
                              peak_flops=1e9),
        )
        history = pretrain(config, log=quiet)
        return float(np.mean([r["loss"] for r in history[-3:]]))

    bf16, blockwise = final_loss("none"), final_loss("blockwise")
    assert bf16 < 0.5 * 6.0  # it learned: ln(384) = 5.95 at the start
    assert abs(blockwise - bf16) < 0.02 * bf16, (bf16, blockwise)
