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

from jaxllm.config import Config, ConfigError, validate_for_devices

MESH_AXES = ("data", "fsdp", "tensor", "expert", "context")
BATCH_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_batch_replica", "data"),  # the batch over data only, whole per FSDP group
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
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


def device_grid(shape: tuple[int, ...], slices: int, devices: Sequence) -> np.ndarray:
    """Devices arranged as `shape`, the physical topology respected.

    With `slices` > 1 (multislice) the first axis (data) is split into `slices` groups over
    DCN, each a whole slice, and the other axes are laid out within a slice over ICI.
    Devices without a `slice_index` (CPU, GPU) are grouped by process.
    """
    if slices == 1:
        return mesh_utils.create_device_mesh(shape, devices)
    ici_shape = (shape[0] // slices, *shape[1:])
    dcn_shape = (slices,) + (1,) * (len(shape) - 1)
    try:
        return mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices,
            process_is_granule=not hasattr(devices[0], "slice_index"),
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
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, "context"))
