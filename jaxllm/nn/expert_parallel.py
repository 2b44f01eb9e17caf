"""Expert parallelism: experts sharded over the `expert` mesh axis, tokens exchanged by all-to-all.

Inside `jax.shard_map`, each device holds a slice of the tokens and E/n of the experts (n the
size of the `expert` axis). The `expert` axis splits the tokens too, alongside the batch axes,
so no device repeats another's expert work (outside this layer the batch is split over the
batch axes only). Each device (`docs/references.md`, "Expert parallelism"):
1. sorts its token-choices by destination shard (the shard holding the chosen expert);
2. exchanges them with `jax.lax.all_to_all` over `expert`, at a fixed capacity of C rows per
   (source, destination) pair;
3. runs its local experts on what it received with `experts.routed_experts`;
4. sends the results back with the inverse all_to_all, unsorts and combines them with the
   gate weights.

The exchange is the portable fixed-capacity all_to_all: `jax.lax.ragged_all_to_all` does not
compile on XLA:CPU ("HLO opcode `ragged-all-to-all` is not supported"). Dropless dispatch
takes C = all K*t local choices, so nothing drops (at n times the exchange volume); capacity
dispatch takes C = ceil(capacity_factor * K*t / n) and drops the choices past it, lower-ranked
choices first.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec

from jaxllm.config import MoEConfig
from jaxllm.nn.experts import PALLAS_KERNELS, resolve_kernel, routed_experts
from jaxllm.parallel import BATCH_AXES, CONTEXT, EXPERT, TENSOR

# The flattened tokens [B*S] split over every axis, in the order that matches the layout of
# activations (batch over data and fsdp, positions over context), then tensor and expert.
TOKEN_AXES = (*BATCH_AXES, CONTEXT, TENSOR, EXPERT)


def token_axes(mesh: AbstractMesh) -> tuple[str, ...]:
    """The axes of `TOKEN_AXES` that `mesh` has; tokens are replicated over any others."""
    return tuple(a for a in TOKEN_AXES if a in mesh.axis_names)


def token_shards(mesh: AbstractMesh) -> int:
    return math.prod(mesh.shape[a] for a in token_axes(mesh))


def expert_mesh(tokens: int) -> AbstractMesh | None:
    """The current mesh if it has an `expert` axis > 1 and its shards split `tokens`, else None.

    None (e.g. no `use_mesh`, or a one-sequence init) means the single-device dispatch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(EXPERT, 1) == 1 or tokens % token_shards(mesh):
        return None
    return mesh


def pair_capacity(cfg: MoEConfig, tokens: int, shards: int) -> int:
    """Rows per (source, destination) pair for `tokens` local tokens over `shards` shards."""
    choices = tokens * cfg.experts_per_token
    if cfg.dispatch == "dropless":
        return choices
    return min(choices, math.ceil(cfg.capacity_factor * choices / shards))


def _exchange(x: jax.Array) -> jax.Array:
    """[n, C, ...] rows for each shard -> [n, C, ...] rows from each shard."""
    return jax.lax.all_to_all(x, EXPERT, split_axis=0, concat_axis=0, tiled=True)


def _pack(x, experts, shards: int, local: int, capacity: int):
    """Sorts the token-choices by destination shard into C slots per destination.

    x [t, D] and experts [t, K], K*t choices in choice-major order as in `routed_experts`,
    so capacity drops lower-ranked choices first. Returns (send [n, C, D], ids [n, C] local
    expert ids or -1 where empty, order, dest and slots [K*t] of the sorted choices).
    """
    tokens, k = experts.shape
    flat = experts.T.reshape(-1)  # [K*t], index k*t + token
    order = jnp.argsort(flat // local, stable=True)
    dest = flat[order] // local  # [K*t] destination shard
    counts = jnp.zeros(shards, jnp.int32).at[dest].add(1)
    slots = jnp.arange(k * tokens) - (jnp.cumsum(counts) - counts)[dest]
    send = jnp.zeros((shards, capacity, x.shape[-1]), x.dtype)
    send = send.at[dest, slots].set(x[order % tokens], mode="drop")
    ids = jnp.full((shards, capacity), -1, jnp.int32)
    ids = ids.at[dest, slots].set(flat[order] % local, mode="drop")
    return send, ids, order, dest, slots


def _local_dispatch(x, weights, experts, wi, wo, *, capacity: int, kernel: str, fp8):
    """One device's expert-parallel MoE.

    Args:
      x: [t, D] local tokens; weights, experts: [t, K] their gates and global expert ids.
      wi, wo: [E/n, D, 2, F] and [E/n, F, D], this shard's experts.
      capacity: C, rows per (source, destination) pair.
      kernel, fp8: as in `routed_experts`.

    Returns:
      ([t, D] output, [1] number of dropped token-choices).
    """
    shards, embed = jax.lax.axis_size(EXPERT), x.shape[-1]
    send, ids, order, dest, slots = _pack(x, experts, shards, wi.shape[0], capacity)
    received, received_ids = _exchange(send), _exchange(ids).reshape(-1, 1)  # [n*C, 1]
    y, _ = routed_experts(
        received.reshape(-1, embed), (received_ids >= 0).astype(x.dtype),
        jnp.maximum(received_ids, 0), wi, wo, capacity=received_ids.shape[0], kernel=kernel,
        fp8=fp8,
    )  # [n*C, D], empty rows zero
    back = _exchange(y.reshape(send.shape))  # [n, C, D], results for our own rows
    kept = slots < capacity
    out = back[dest, jnp.minimum(slots, capacity - 1)] * kept[:, None]  # [K*t, D] sorted
    out = out[jnp.argsort(order)].reshape(experts.shape[1], -1, embed)  # unsort: [K, t, D]
    y = jnp.einsum("ktd,tk->td", out, weights.astype(out.dtype))
    return y, jnp.sum(~kept, dtype=jnp.float32)[None]


def routed_experts_parallel(x, weights, experts, wi, wo, *, mesh: AbstractMesh, cfg: MoEConfig,
                            fp8=None):
    """`experts.routed_experts` with the experts sharded over `mesh`'s `expert` axis.

    x [T, D], weights and experts [T, K], wi [E, D, 2, F], wo [E, F, D]; T must divide over
    the token shards. Returns ([T, D] output, the fraction of token-choices dropped).
    """
    token_spec, expert_spec = PartitionSpec(token_axes(mesh)), PartitionSpec(EXPERT)
    capacity = pair_capacity(cfg, x.shape[0] // token_shards(mesh), mesh.shape[EXPERT])
    local = jax.shard_map(
        lambda *args: _local_dispatch(*args, capacity=capacity, kernel=cfg.kernel, fp8=fp8),
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, expert_spec, expert_spec),
        out_specs=(token_spec, token_spec),
        # A Pallas call does not type how its output varies over the mesh.
        check_vma=resolve_kernel(cfg.kernel) not in PALLAS_KERNELS,
    )
    y, dropped = local(x, weights, experts, wi, wo)
    return y, dropped.sum() / experts.size
