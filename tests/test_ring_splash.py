"""Ring attention with splash attention on its chunk pairs: which pairs splash takes, the ring
against naive full attention (Pallas interpret mode on CPU), and the real kernel compiled for
a TPU topology mesh."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_ring import check_against_reference

from jaxllm.nn import ring_splash
from jaxllm.nn.context_order import permutation
from jaxllm.nn.masks import Mask, visible
from jaxllm.nn.ring import ring_attention

CHUNK = 128  # splash's smallest block


@pytest.mark.parametrize(
    "order, chunks, want",
    [("zigzag", 2, {"empty": 28, "full": 28, "causal": 8}),
     ("striped", 1, {"causal": 10, "strict": 6})],
)
def test_causal_orders_give_every_nonempty_pair_to_splash(order, chunks, want):
    """Every (query chunk, key chunk) pair of a 4-device ring, classified from its mask."""
    n, parts = 4, 4 * chunks
    length = 8 * parts
    pos = np.split(np.arange(length)[None, permutation(order, length, n)], parts, axis=1)
    seg = np.zeros_like(pos[0])
    names = ("empty", *ring_splash.KINDS, "other")
    classify = jax.jit(ring_splash.classify)
    counts = Counter(
        names[int(classify(visible(Mask(), qp, seg, kp, seg), seg, seg))]
        for qp in pos for kp in pos)
    assert counts == want


@pytest.mark.parametrize(
    "n, order, options",
    [
        (2, "zigzag", {"segments": True}),
        (4, "striped", {"kv_heads": 1, "segments": True, "chunks": 1}),
        (2, "plain", {"causal": False, "segments": True, "batch": 2, "kv_heads": 4,
                      "chunks": 1}),
        (2, "plain", {"window": 200, "chunks": 1}),
    ],
    ids=["n2-zigzag-gqa-segments", "n4-striped-mqa-segments", "n2-plain-noncausal-mha-batch2",
         "n2-plain-window"],
)
def test_splash_ring_matches_full_attention(n, order, options):
    """Zigzag runs full and causal pairs through splash, striped also strictly causal ones,
    non-causal full ones; under the window one pair is causal, one needs the pure-JAX update."""
    length = n * options.get("chunks", 2) * CHUNK
    check_against_reference(ring_attention, n, order, length=length, block_kernel="splash",
                            **options)


def test_splash_ring_compiles_for_a_tpu_mesh():
    """The default block kernel on a TPU target is splash: the Mosaic kernels, not interpret
    mode, lower and compile, forward and backward."""
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = Mesh(np.asarray(devices), ("context",))
    length, dim = 4 * 2 * CHUNK, 128
    tokens = NamedSharding(mesh, P(None, "context"))
    q, k, v = (jax.ShapeDtypeStruct((1, length, h, dim), jnp.bfloat16, sharding=tokens)
               for h in (4, 2, 2))
    pos, seg = (jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=tokens) for _ in range(2))

    def loss(q, k, v, pos, seg):
        out = ring_attention(q, k, v, pos, seg)
        return jnp.mean(out.astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, pos, seg)
        lowered.compile()
    text = lowered.as_text()
    assert "tpu_custom_call" in text
    for kernel in ("splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented",
                   "splash_mha_dkv_segmented"):
        assert kernel in text, kernel
