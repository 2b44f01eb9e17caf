"""`benchmarks/kernel_profile.top_kernels` on CPU traces of known programs: each op counted
once per run, a loop's body counted and not the loop, and the matmuls on top."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def kernel_profile(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import kernel_profile

    return kernel_profile


def test_top_kernels_counts_each_op_of_each_call_once(kernel_profile):
    a = jnp.ones((256, 2048), jnp.float32)
    b = jnp.ones((2048, 2048), jnp.float32)
    program = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b + 1.0)
    jax.block_until_ready(program(a, b))
    profile = kernel_profile.top_kernels(lambda: program(a, b), calls=3)
    kernels = profile["kernels"]
    assert profile["calls"] == 3
    assert len(kernels) >= 3, kernels
    assert all(k["launches"] == 1 for k in kernels), kernels
    seconds = [k["seconds"] for k in kernels]
    assert seconds == sorted(seconds, reverse=True)
    assert sum(seconds) == pytest.approx(profile["busy_s"])
    assert sum(k["share"] for k in kernels) == pytest.approx(1.0)
    # Each matmul is 2 GFLOP; the elementwise ops touch half a million numbers.
    assert kernels[0]["share"] + kernels[1]["share"] > 0.7, kernels
    [slowest] = kernel_profile.top_kernels(lambda: program(a, b), calls=1, top=1)["kernels"]
    assert slowest["share"] < 1.0


def test_a_loop_counts_its_body_and_not_itself(kernel_profile):
    x = jnp.ones((512, 512))
    program = jax.jit(lambda x: jax.lax.fori_loop(0, 4, lambda i, y: jnp.sin(y @ x), x) + 1.0)
    jax.block_until_ready(program(x))
    kernels = kernel_profile.top_kernels(lambda: program(x), calls=2)["kernels"]
    assert kernels[0]["launches"] == 4, kernels
    assert not [k for k in kernels if k["name"].startswith("while")], kernels
