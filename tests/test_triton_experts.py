"""kernel=triton_gmm (the Pallas Triton grouped matmul, interpret mode on CPU) against the
ragged_dot kernel on values and gradients; under a mesh; the kernel lowered for CUDA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import MeshConfig
from jaxllm.nn.experts import ragged_swiglu, resolve_kernel, routed_experts, triton_swiglu
from test_expert_parallel import DEEPSEEK_LIKE, moe_grads
from test_gpu_attention import gpu_mesh
from test_gmm import assert_close, dropping_case, make_mesh, moe_case, routed_grads

# D = 40 takes two contraction steps of 32 float32 elements, the second overhanging; 2F = 144
# two column tiles of 128 and dW three tiles of 64. 60 rows make blocks of 16: groups cross
# block boundaries, empty experts come first, between and last, and one takes every row.
EMBED, HIDDEN, NUM_EXPERTS, ROWS = 40, 72, 5, 60
GROUP_SIZES = [(0, 17, 0, 43, 0), (0, 0, 60, 0, 0), (12, 12, 12, 12, 12)]
BFLOAT16_TOLERANCE = 3e-2  # bf16 inputs and outputs of unit scale


def swiglu_inputs(dtype):
    x = jax.random.normal(jax.random.key(0), (ROWS, EMBED))
    wi = jax.random.normal(jax.random.key(1), (NUM_EXPERTS, EMBED, 2, HIDDEN)) / EMBED**0.5
    wo = jax.random.normal(jax.random.key(2), (NUM_EXPERTS, HIDDEN, EMBED)) / HIDDEN**0.5
    return tuple(a.astype(dtype) for a in (x, wi, wo))


def swiglu_grads(fn):
    """The jitted value and (x, wi, wo) gradients of sum(fn(x, group_sizes, wi, wo) * c)."""
    cotangent = jax.random.normal(jax.random.key(3), (ROWS, EMBED)) / ROWS**0.5

    def loss(x, wi, wo, group_sizes):
        out = fn(x, group_sizes, wi, wo).astype(jnp.float32)
        return jnp.sum(out * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def triton(x, group_sizes, wi, wo):
    experts = jnp.repeat(jnp.arange(NUM_EXPERTS), group_sizes, total_repeat_length=ROWS)
    return triton_swiglu(x, experts, group_sizes, wi, wo)


def test_triton_swiglu_equals_ragged_dot_in_float32():
    got, want = swiglu_grads(triton), swiglu_grads(ragged_swiglu)  # each compiled once
    inputs = swiglu_inputs(jnp.float32)
    for sizes in GROUP_SIZES:
        group_sizes = jnp.array(sizes, jnp.int32)
        assert_close(got(*inputs, group_sizes), want(*inputs, group_sizes))


def test_triton_swiglu_in_bfloat16_stays_within_bfloat16_rounding_of_float32():
    """bf16 inputs against ragged_dot in float32 on the same (rounded) inputs."""
    inputs = swiglu_inputs(jnp.bfloat16)
    group_sizes = jnp.array(GROUP_SIZES[0], jnp.int32)
    loss, grads = swiglu_grads(triton)(*inputs, group_sizes)
    want = swiglu_grads(ragged_swiglu)(*(a.astype(jnp.float32) for a in inputs), group_sizes)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a, np.float32), b, rtol=BFLOAT16_TOLERANCE, atol=BFLOAT16_TOLERANCE),
        (loss, grads), want)


def test_routed_triton_gmm_masks_the_dropped_choices_like_ragged_dot():
    """Gradients w.r.t. x, the routing weights, wi and wo."""
    args = dropping_case()
    assert_close(routed_grads("triton_gmm", *args), routed_grads("ragged_dot", *args))


TRITON_GMM = dataclasses.replace(DEEPSEEK_LIKE, kernel="triton_gmm")


@pytest.mark.parametrize("mesh_config, collective", [
    (MeshConfig(data=2, tensor=4), "all-reduce"),  # per device, hidden split over tensor
    (MeshConfig(data=2, expert=4), "all-to-all"),  # inside expert parallelism's shard_map
], ids=["data2_tensor4", "data2_expert4"])
def test_triton_gmm_layer_under_a_mesh_equals_ragged_dot_on_one_device(mesh_config, collective):
    variables, x, cotangent, want = moe_case()
    *got, metrics, hlo = moe_grads(TRITON_GMM, variables, x, cotangent, make_mesh(mesh_config, 8))
    assert collective in hlo
    assert_close(tuple(got), want)
    assert float(metrics["dropped_fraction"]) == 0.0


def routed_grad_lowered_for_cuda(kernel: str, hidden: int):
    """The gradient of a routed bf16 MoE with `kernel` (256 tokens of 384, top-2 of 8
    experts of width `hidden`) lowered for CUDA under a GPU mesh, where "auto" stays
    block_sparse."""
    x = jax.ShapeDtypeStruct((256, 384), jnp.bfloat16)
    weights = jax.ShapeDtypeStruct((256, 2), jnp.bfloat16)
    experts = jax.ShapeDtypeStruct((256, 2), jnp.int32)
    wi = jax.ShapeDtypeStruct((8, 384, 2, hidden), jnp.bfloat16)
    wo = jax.ShapeDtypeStruct((8, hidden, 384), jnp.bfloat16)

    def loss(x, weights, experts, wi, wo):
        y, _ = routed_experts(x, weights, experts, wi, wo, capacity=256, kernel=kernel)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    with jax.sharding.use_abstract_mesh(gpu_mesh()):
        assert resolve_kernel("auto") == "block_sparse"
        return jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4))).trace(
            x, weights, experts, wi, wo).lower(lowering_platforms=("cuda",))


def test_triton_gmm_lowers_for_cuda_forward_and_backward_and_auto_stays_block_sparse():
    """The real Triton kernels, not interpret mode: two grouped matmuls forward, and for each
    a dx and a dW kernel backward. "auto" does not pick triton_gmm until a GPU run has
    measured it."""
    text = routed_grad_lowered_for_cuda("triton_gmm", hidden=200).as_text()
    assert text.count("xla.gpu.triton") == 6
    assert "gmm_forward" in text and "gmm_weight_grad" in text
