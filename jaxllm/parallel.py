"""The device mesh and the logical-axis rules that shard the whole model.

Parameters and activations name their axes logically (`embed`, `heads`, `act_batch`, ...).
`RULES` maps those names onto the five mesh axes, so this one table decides how every
tensor is laid out. GSPMD does the rest.
"""

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import Config, ConfigError

# The mesh axes, by name; every module that names a mesh axis imports it from here.
DATA, FSDP, TENSOR, EXPERT, CONTEXT = "data", "fsdp", "tensor", "expert", "context"
MESH_AXES = (DATA, FSDP, TENSOR, EXPERT, CONTEXT)
BATCH_AXES = (DATA, FSDP)  # the axes that split the batch of sequences

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", TENSOR),
    ("embed", FSDP),
    ("q_lora", FSDP),  # MLA's up-projections have no embed axis; their latent takes fsdp
    ("kv_lora", FSDP),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("mlp", TENSOR),
    ("expert", EXPERT),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_batch_replica", DATA),  # the batch over data only, whole per FSDP group
    ("act_length", CONTEXT),
    ("act_embed", None),
    ("act_heads", TENSOR),
    ("act_kv_heads", TENSOR),
    ("act_mlp", TENSOR),
    ("act_vocab", TENSOR),
)


def make_mesh(config: Config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor, expert, context) mesh the config asks for.

    Raises ConfigError when the axis sizes cannot tile the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = validate_for_devices(config, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return Mesh(
        device_grid(shape, config.mesh.slices, devices),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def validate_for_devices(config: Config, num_devices: int) -> dict[str, int]:
    """Resolves -1 in the mesh and checks the mesh and batch against the device count.

    Returns the concrete mesh shape.
    """
    sizes = _resolve_mesh_sizes(config.mesh.shape, num_devices)
    _check_splits(config, sizes)
    return sizes


def _resolve_mesh_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """`sizes` with the -1 axis given the devices left over; they must tile the devices."""
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if -1 in sizes.values():
        if num_devices % fixed != 0:
            raise ConfigError(f"mesh: the fixed axes {sizes} (product {fixed}) do not divide "
                              f"the {num_devices} devices")
        sizes = {axis: num_devices // fixed if size == -1 else size for axis, size in sizes.items()}
    product = int(np.prod(list(sizes.values())))
    if product != num_devices:
        raise ConfigError(f"mesh: the axis sizes {sizes} multiply to {product}, but there are "
                          f"{num_devices} devices; make the product match or set one axis to -1")
    return sizes


def _check_splits(config: Config, sizes: dict[str, int]) -> None:
    """The experts, slices, batch and sequences split evenly over the mesh axes `sizes`."""
    moe = config.model.moe
    if moe is not None and moe.expert_parallel and moe.num_experts % sizes[EXPERT] != 0:
        raise ConfigError(f"model.moe.num_experts: expert parallelism needs "
                          f"mesh.expert={sizes[EXPERT]} to divide the experts; change either, "
                          "or set model.moe.expert_parallel=false")
    if sizes[DATA] % config.mesh.slices != 0:
        raise ConfigError(f"mesh.slices: the data axis ({sizes[DATA]}) must split evenly over "
                          f"{config.mesh.slices} slices")
    t = config.train
    batch_shards = sizes[DATA] * sizes[FSDP]
    if (t.batch_size // t.grad_accum) % batch_shards != 0:
        raise ConfigError(f"train.batch_size: each of the {t.grad_accum} micro-batches of "
                          f"{t.batch_size // t.grad_accum} sequences must split evenly over "
                          f"mesh.data*mesh.fsdp={batch_shards} shards")
    context = sizes[CONTEXT]
    if context != 1 and t.seq_len % (2 * context) != 0:
        raise ConfigError(f"train.seq_len: {t.seq_len} must be a multiple of {2 * context}: "
                          "ring attention cuts each sequence into 2 chunks on each of the "
                          f"mesh.context={context} devices")


def device_grid(shape: tuple[int, ...], slices: int, devices: Sequence) -> np.ndarray:
    """Devices arranged as `shape`, the physical topology respected.

    With `slices` > 1 (multislice) the first axis (data) is split into `slices` groups over
    DCN, each a whole slice, and the other axes are laid out within a slice over ICI.
    Devices without a `slice_index` (CPU, GPU) are grouped by process. An axis that no
    product of whole torus axes makes (8 on a 4x4x4 v5p-128) splits a physical axis.
    """
    if slices == 1:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    ici_shape = (shape[0] // slices, *shape[1:])
    dcn_shape = (slices,) + (1,) * (len(shape) - 1)
    try:
        return mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices,
            process_is_granule=not hasattr(devices[0], "slice_index"),
            allow_split_physical_axes=True,
        )
    except ValueError as error:
        raise ConfigError(f"mesh.slices: {slices} slices do not fit the devices: {error}") from None


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=RULES) -> Iterator[None]:
    """Makes `mesh` and the logical rules current, so that modules' logical constraints
    take effect while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _mesh_spec(logical: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, rules) -> PartitionSpec:
    """Logical spec -> mesh spec; a dimension the mesh axes do not divide stays replicated."""
    spec = nn.logical_to_mesh_axes(logical, rules)
    dims = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        shards = int(np.prod([mesh.shape[a] for a in names]))
        dims.append(axes if names and size % shards == 0 else None)
    return PartitionSpec(*dims)


def shardings(boxed_tree, mesh: Mesh, rules=RULES):
    """NamedShardings for a tree of `nn.LogicallyPartitioned` values (or their shapes).

    Leaves without logical names are replicated.
    """
    logical = nn.get_partition_spec(boxed_tree)
    shapes = jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x,
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _mesh_spec(spec, x.shape, mesh, rules)),
        logical,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sequences split over (data, fsdp), positions over context."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, CONTEXT))


def batch_shardings(mesh: Mesh, keys) -> dict[str, NamedSharding]:
    """The sharding of each array `keys` names in a training batch: [B, S] arrays as
    `batch_sharding`; the rows' image `patches` [B, P, patch_dim] over (data, fsdp) only,
    each row's patches whole on its devices."""
    per_token, per_row = batch_sharding(mesh), NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    return {key: per_row if key == "patches" else per_token for key in keys}
