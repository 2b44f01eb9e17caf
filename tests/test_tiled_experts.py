"""The tiled grouped SwiGLU against a Python loop over experts, on values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.nn.tiled_experts import tile_sizes, tiled_swiglu


def loop_over_experts(x, group_sizes, wi, wo):
    """Each expert's rows, sliced out in Python, through its own SwiGLU."""
    outputs, start = [], 0
    for expert, size in enumerate(group_sizes):
        gate_up = jnp.einsum("td,dgf->tgf", x[start : start + size], wi[expert])
        outputs.append((jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]) @ wo[expert])
        start += size
    return jnp.concatenate(outputs)


def test_tiled_swiglu_matches_a_loop_over_experts():
    """Tiles of 8, 4 and 2 rows. Expert 1's 21 rows take two whole tiles of 8, one of 4 and
    one of 2 that overhangs into expert 4's rows, which must neither change nor feed
    expert 1's gradients; expert 4's last tile would run past the last row. Empty experts
    come first, between and last (`test_moe` has every row on one expert)."""
    group_sizes = (0, 21, 0, 0, 19, 0)
    x = jax.random.normal(jax.random.key(0), (sum(group_sizes), 8))
    wi = 0.3 * jax.random.normal(jax.random.key(1), (6, 8, 2, 6))
    wo = 0.3 * jax.random.normal(jax.random.key(2), (6, 6, 8))
    cotangent = jax.random.normal(jax.random.key(3), x.shape)
    sizes = jnp.array(group_sizes, jnp.int32)

    def grads(fn):
        loss = lambda x, wi, wo: jnp.sum(fn(x, wi, wo) * cotangent)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, wi, wo)

    got = grads(lambda x, wi, wo: tiled_swiglu(x, sizes, wi, wo, 8, 2))
    want = grads(lambda x, wi, wo: loop_over_experts(x, group_sizes, wi, wo))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


def test_tile_sizes_follow_the_mean_group_size():
    assert tile_sizes(8192, 8) == (1024, 128)  # mean 1024
    assert tile_sizes(24576, 64) == (256, 128)  # mean 384
    assert tile_sizes(1 << 20, 8) == (1024, 128)  # capped
    assert tile_sizes(24, 4) == (8, 8)  # at least 8 rows
    assert tile_sizes(3, 4) == (2, 2)  # at most the rows
