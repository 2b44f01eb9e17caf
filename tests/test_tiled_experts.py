"""The tiled routed experts against a Python loop over experts, on values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.nn.tiled_experts import tile_sizes, tiled_moe


def loop_over_experts(x, tokens, weights, group_sizes, wi, wo):
    """Each expert's rows, sliced out in Python: its SwiGLU of their tokens, weighted and
    added into those tokens' outputs."""
    y, start = jnp.zeros_like(x), 0
    for expert, size in enumerate(group_sizes):
        rows = slice(start, start + size)
        gate_up = jnp.einsum("td,dgf->tgf", x[tokens[rows]], wi[expert])
        out = (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]) @ wo[expert]
        y = y.at[tokens[rows]].add(out * weights[rows, None])
        start += size
    return y


def test_tiled_moe_matches_a_loop_over_experts():
    """Tiles of 8, 4 and 2 rows. Expert 1's 21 rows, padded to 22, take two whole tiles of
    8, one of 4 and one of 2 that holds a gap row (token 0, weight 0), which must neither
    change y nor feed any gradient; expert 4's 19 rows take 8, 8 and 4. Empty experts come
    first, between and last (`test_moe` has every row on one expert). 40 rows of 20
    tokens: each token is chosen twice."""
    group_sizes = (0, 21, 0, 0, 19, 0)
    tokens = jax.random.permutation(jax.random.key(4), jnp.arange(40) % 20)
    x = jax.random.normal(jax.random.key(0), (20, 8))
    weights = jax.random.uniform(jax.random.key(5), (40,))
    wi = 0.3 * jax.random.normal(jax.random.key(1), (6, 8, 2, 6))
    wo = 0.3 * jax.random.normal(jax.random.key(2), (6, 6, 8))
    cotangent = jax.random.normal(jax.random.key(3), x.shape)
    sizes = jnp.array(group_sizes, jnp.int32)

    def grads(fn):
        loss = lambda *args: jnp.sum(fn(*args) * cotangent)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, weights, wi, wo)

    got = grads(lambda x, w, wi, wo: tiled_moe(x, tokens, w, sizes, wi, wo, 8, 2))
    want = grads(lambda x, w, wi, wo: loop_over_experts(x, tokens, w, group_sizes, wi, wo))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


def test_tile_sizes_follow_the_mean_group_size():
    assert tile_sizes(8192, 8) == (1024, 128)  # mean 1024
    assert tile_sizes(24576, 64) == (256, 128)  # mean 384
    assert tile_sizes(1 << 20, 8) == (1024, 128)  # capped
    assert tile_sizes(24, 4) == (8, 8)  # at least 8 rows
    assert tile_sizes(3, 4) == (2, 2)  # at most the rows
