"""What the attention kernels read from the current mesh: how many devices split the
sequence, and how activations split inside a kernel's `jax.shard_map`."""

import math

import jax
from jax.sharding import PartitionSpec as P

from jaxllm.parallel import BATCH_AXES, CONTEXT, TENSOR


def context_shards(axis_name: str = CONTEXT) -> int:
    """Devices on the current mesh's `axis_name` axis (`jax.set_mesh`); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or axis_name not in mesh.axis_names else mesh.shape[axis_name]


def batch_and_head_axes(mesh, *, batch: int, heads: int, kv_heads: int):
    """(batch axes, head axis) of [B, S, H, D] attention activations on `mesh`: the batch over
    the data/fsdp axes and the heads over `tensor` where those divide them, as
    `jaxllm.parallel` lays out the activations, else None (replicated), e.g. for the single
    row that initialises a model."""
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not batch_axes or batch % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes = None
    tensor = mesh.shape.get(TENSOR, 1)
    head_axis = TENSOR if tensor > 1 and heads % tensor == kv_heads % tensor == 0 else None
    return batch_axes, head_axis


def per_device(run, *, q_shape: tuple[int, ...], kv_heads: int):
    """`run`, a kernel over [B, S, H, D] q, k, v and [B, S] segment ids that GSPMD cannot
    partition (a Pallas call), inside `jax.shard_map` over the current mesh: batch and heads
    as `batch_and_head_axes` splits them, the sequence whole. Without a mesh, `run`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run
    batch, head_axis = batch_and_head_axes(mesh, batch=q_shape[0], heads=q_shape[2],
                                           kv_heads=kv_heads)
    heads, tokens = P(batch, None, head_axis, None), P(batch, None)
    return jax.shard_map(run, in_specs=(heads, heads, heads, tokens), out_specs=heads,
                         check_vma=False)
