"""Position encodings against hand-computed references: ALiBi slopes, RoPE, linear / YaRN scaling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.nn.positions import (
    RopeScaling,
    alibi_slopes,
    apply_rope,
    rope_frequencies,
    softmax_scale,
    yarn_mscale,
)

# ---------------------------------------------------------------- ALiBi (Press et al. 2022)


def test_alibi_power_of_two():
    assert alibi_slopes(8).dtype == np.float32
    np.testing.assert_array_equal(
        alibi_slopes(8), [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    )
    # n = 16: 2^(-8k/16) = 2^(-k/2), k = 1..16
    r = 2**-0.5
    np.testing.assert_allclose(alibi_slopes(16), [r**k for k in range(1, 17)], rtol=1e-7)
    np.testing.assert_allclose(alibi_slopes(16)[1::2], [2.0**-k for k in range(1, 9)], rtol=0)


def test_alibi_not_power_of_two():
    # 12 heads: m = 8 gives 2^-1 .. 2^-8; then the 16-head slopes 2^(-k/2) at k = 1, 3, 5, 7
    want_12 = [2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 2**-6, 2**-7, 2**-8, 2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    np.testing.assert_allclose(alibi_slopes(12), want_12, rtol=1e-7)
    # 6 heads: m = 4 gives 2^-2, 2^-4, 2^-6, 2^-8; then the 8-head slopes at k = 1, 3
    np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rtol=0)
    # 5 heads: the 4-head slopes, then the 8-head slope at k = 1
    np.testing.assert_allclose(alibi_slopes(5), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1], rtol=0)
    assert alibi_slopes(1).tolist() == [2**-8]


# ---------------------------------------------------------------- RoPE without scaling


def rope_reference(x, positions, theta):
    """Independent numpy RoPE: pair (i, i + d/2) is a complex number rotated by pos * theta^(-2i/d)."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    freqs = theta ** (-2.0 * np.arange(half) / x.shape[-1])
    phase = np.exp(1j * np.asarray(positions, np.float64)[:, :, None, None] * freqs)
    z = (x[..., :half] + 1j * x[..., half:]) * phase
    return np.concatenate([z.real, z.imag], axis=-1)


def test_unscaled_rope_matches_reference_and_old_frequencies():
    x = jax.random.normal(jax.random.key(0), (2, 7, 3, 16))
    positions = jnp.broadcast_to(jnp.arange(7) * 13, (2, 7))
    np.testing.assert_allclose(apply_rope(x, positions, 10_000.0), rope_reference(x, positions, 10_000.0), atol=1e-5)
    old = 10_000.0 ** (-jnp.arange(0, 16, 2, dtype=jnp.float32) / 16)
    np.testing.assert_array_equal(rope_frequencies(16, 10_000.0), old)
    np.testing.assert_array_equal(rope_frequencies(16, 10_000.0, None), old)
    np.testing.assert_array_equal(apply_rope(x, positions, 10_000.0, None), apply_rope(x, positions, 10_000.0))


@pytest.mark.parametrize("scaling", [None, RopeScaling("linear", 4.0), RopeScaling("yarn", 40.0)])
def test_rope_scores_depend_only_on_relative_position(scaling):
    q = jax.random.normal(jax.random.key(0), (1, 5, 2, 64))
    k = jax.random.normal(jax.random.key(1), (1, 5, 2, 64))
    positions = jnp.arange(5)[None]

    def scores(shift):
        rq = apply_rope(q, positions + shift, 10_000.0, scaling)
        rk = apply_rope(k, positions + shift, 10_000.0, scaling)
        return jnp.einsum("bthd,bshd->bhts", rq, rk)

    np.testing.assert_allclose(scores(0), scores(37), atol=1e-4)
    np.testing.assert_allclose(scores(0), scores(1000), atol=1e-3)
    assert not np.allclose(scores(0), jnp.einsum("bthd,bshd->bhts", q, k), atol=1e-2)


# ---------------------------------------------------------------- linear scaling


def test_linear_scaling_is_position_interpolation():
    x = jax.random.normal(jax.random.key(2), (1, 9, 2, 32))
    positions = (jnp.arange(9) * 37)[None]
    scaled = apply_rope(x, positions, 10_000.0, RopeScaling("linear", 8.0))
    np.testing.assert_allclose(scaled, apply_rope(x, positions / 8.0, 10_000.0), atol=1e-5)
    assert not np.allclose(scaled, apply_rope(x, positions, 10_000.0), atol=1e-2)


# ---------------------------------------------------------------- YaRN (Peng et al. 2023)

YARN = RopeScaling("yarn", factor=40.0, original_max_len=4096, beta_fast=32.0, beta_slow=1.0)


def test_yarn_frequencies_by_hand():
    d, theta, s, L = 64, 10_000.0, 40.0, 4096
    got = np.asarray(rope_frequencies(d, theta, YARN), np.float64)
    assert got.shape == (32,) and rope_frequencies(d, theta, YARN).dtype == jnp.float32
    f = lambda i: theta ** (-2 * i / d)  # noqa: E731

    # pair i makes L * f(i) / (2 pi) rotations over L; the pair index at r rotations is
    # d * ln(L / (2 pi r)) / (2 ln theta): r = 32 -> 64 * ln(20.372) / 18.421 = 10.47, floor -> 10;
    # r = 1 -> 64 * ln(651.9) / 18.421 = 22.52, ceil -> 23. So the ramp runs over i in [10, 23].
    assert math.floor(d * math.log(L / (2 * math.pi * 32)) / (2 * math.log(theta))) == 10
    assert math.ceil(d * math.log(L / (2 * math.pi * 1)) / (2 * math.log(theta))) == 23

    # high frequency: i = 2, 4096 * 10000^(-4/64) / (2 pi) ~ 367 rotations > 32: kept
    assert L * f(2) / (2 * math.pi) > 32
    np.testing.assert_allclose(got[2], 10_000 ** (-4 / 64), rtol=1e-6)
    # low frequency: i = 28, ~0.21 rotations < 1: interpolated, f / 40
    assert L * f(28) / (2 * math.pi) < 1
    np.testing.assert_allclose(got[28], 10_000 ** (-56 / 64) / 40, rtol=1e-6)
    # in the ramp: i = 16, interpolation weight (16 - 10) / (23 - 10) = 6/13
    w = 6 / 13
    np.testing.assert_allclose(got[16], (1 - w) * 10_000 ** (-32 / 64) + w * 10_000 ** (-32 / 64) / 40, rtol=1e-6)
    # whole vector: weight clip((i - 10) / 13, 0, 1)
    weight = np.clip((np.arange(32) - 10) / 13, 0, 1)
    freqs = f(np.arange(32))
    np.testing.assert_allclose(got, freqs * (1 - weight) + freqs / s * weight, rtol=1e-6)



def test_yarn_correction_range_rounds_outward():
    # d = 128, theta = 5e4, x32 from 4096: pair index at 32 rotations 128 * ln(20.372) / (2 ln 5e4)
    # = 17.83 -> floor 17; at 1 rotation 128 * ln(651.9) / (2 ln 5e4) = 38.33 -> ceil 39 (rounding
    # to nearest would give 18 and 38). Interpolation weight (i - 17) / 22.
    got = np.asarray(rope_frequencies(128, 5e4, RopeScaling("yarn", 32.0)), np.float64)
    f = lambda i: 5e4 ** (-2 * i / 128)  # noqa: E731
    np.testing.assert_allclose(got[17], f(17), rtol=1e-6)
    np.testing.assert_allclose(got[18], (21 / 22) * f(18) + (1 / 22) * f(18) / 32, rtol=1e-6)
    np.testing.assert_allclose(got[38], (1 / 22) * f(38) + (21 / 22) * f(38) / 32, rtol=1e-6)
    np.testing.assert_allclose(got[39], f(39) / 32, rtol=1e-6)

def test_yarn_bands_by_rotation_count():
    """Convention-free check: > beta_fast rotations kept, < beta_slow rotations divided by factor."""
    for d, theta, scaling in [(64, 10_000.0, YARN), (128, 50_000.0, RopeScaling("yarn", 32.0)), (128, 1e6, RopeScaling("yarn", 4.0, 8192))]:
        base = theta ** (-2.0 * np.arange(d // 2) / d)
        rotations = scaling.original_max_len * base / (2 * math.pi)
        got = np.asarray(rope_frequencies(d, theta, scaling), np.float64)
        fast, slow = rotations > scaling.beta_fast, rotations < scaling.beta_slow
        assert fast.any() and slow.any()
        np.testing.assert_allclose(got[fast], base[fast], rtol=1e-6)
        np.testing.assert_allclose(got[slow], base[slow] / scaling.factor, rtol=1e-6)
        assert np.all(got <= base * (1 + 1e-6)) and np.all(got >= base / scaling.factor * (1 - 1e-6))


def test_yarn_mscale_and_softmax_scale():
    assert yarn_mscale(40) == pytest.approx(0.1 * math.log(40) + 1)
    assert yarn_mscale(40, 0.707) == pytest.approx(0.1 * 0.707 * math.log(40) + 1)
    assert yarn_mscale(1) == 1.0 and yarn_mscale(0.5) == 1.0
    assert softmax_scale(64) == pytest.approx(1 / 8)
    assert softmax_scale(64, RopeScaling("linear", 4.0)) == pytest.approx(1 / 8)
    # DeepSeek-V3: qk head dim 192, YaRN x40 -> 192^-1/2 * (0.1 ln 40 + 1)^2 ~ 0.1354
    assert softmax_scale(192, YARN) == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert softmax_scale(192, YARN) == pytest.approx(0.13523, rel=1e-4)
