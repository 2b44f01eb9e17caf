"""Cloud TPU slice names, and the devices of a slice without the hardware.

Google's names count TensorCores for v4 and v5p (v5p-128 is 64 chips, 4x4x4) and chips for
v5e and v6e (v5e-256 is 16x16). libtpu names a slice by its chip grid ("v5p:4x4x4"), and
`jax.experimental.topologies` gives its devices on any machine, so the TPU compiler can
compile for it ahead of time. Chip figures are from the Cloud TPU system architecture pages.
"""

import contextlib
import dataclasses
import math
import os

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: its name prefix, libtpu's, HBM and dense bf16 peak per chip, and
    the chip grid of each slice size Google sells."""

    name: str
    libtpu: str
    hbm_bytes: int
    peak_flops: float
    cores_per_chip: int  # TensorCores a slice name counts per chip
    grids: dict[int, tuple[int, ...]]  # slice size as named -> chip grid


def _cube_grids(max_chips: int) -> dict[int, tuple[int, ...]]:
    """3-D tori named by TensorCores (2 per chip): v4-8 / v5p-8 is 2x2x1 chips, and each
    doubling doubles the smallest axis."""
    grids, grid = {}, [2, 2, 1]
    while math.prod(grid) <= max_chips:
        grids[2 * math.prod(grid)] = tuple(grid)
        grid[grid.index(min(grid))] *= 2
        grid.sort()
    return grids


_FLAT_GRIDS = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
               128: (8, 16), 256: (16, 16)}

GENERATIONS = {
    "v4": Generation("v4", "v4", 32 * GiB, 275e12, 2, _cube_grids(2048)),
    "v5p": Generation("v5p", "v5p", 95 * GiB, 459e12, 2, _cube_grids(6144)),
    "v5e": Generation("v5e", "v5e", 16 * GiB, 197e12, 1, _FLAT_GRIDS),
    "v6e": Generation("v6e", "v6e", 32 * GiB, 918e12, 1, _FLAT_GRIDS),
}
ALIASES = {"v5litepod": "v5e"}


class TopologyError(ValueError):
    """A slice name that names no Cloud TPU slice; the message lists the valid ones."""


class NotFitting(ValueError):
    """A step that needs more memory than a device of the slice holds."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice (or `slices` identical slices joined over DCN) of one TPU generation."""

    name: str  # as the user wrote it, e.g. "v5p-128"
    generation: Generation
    grid: tuple[int, ...]  # chips per slice along each torus axis
    slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(self.grid) * self.slices

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation.libtpu}:{'x'.join(map(str, self.grid))}"

    def devices(self) -> list:
        """The slice's devices as libtpu describes them, with no TPU attached."""
        from jax.experimental import topologies

        options = {"chips_per_host_bounds": [1, 1, 1]} if self.grid == (1, 1) else {}
        if self.generation.cores_per_chip == 2:  # one device per chip, as a v4 or v5p VM runs
            options["chip_config_name"] = "megacore"
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiling processes
        with _quiet_stderr():
            desc = topologies.get_topology_desc(topology_name=self.libtpu_name, platform="tpu",
                                                num_slices=self.slices, **options)
        return list(desc.devices)

    def hbm_per_device(self, devices: list) -> int:
        """HBM one device may use: the chip's, shared by its devices where a chip holds
        several."""
        return self.generation.hbm_bytes * self.chips // len(devices)


def valid_names() -> list[str]:
    names = []
    for gen in GENERATIONS.values():
        names += [f"{gen.name}-{size}" for size in gen.grids]
    return names


def parse(name: str, slices: int = 1) -> Topology:
    """"v5p-128" (or "v5litepod-16", ...) -> its Topology; a TopologyError lists the valid
    names when `name` is not one."""
    prefix, _, size = name.strip().lower().partition("-")
    generation = GENERATIONS.get(ALIASES.get(prefix, prefix))
    if slices < 1:
        raise TopologyError(f"--slices: must be >= 1, got {slices}")
    if generation is None or not size.isdigit() or int(size) not in generation.grids:
        raise TopologyError(f"--topology: {name!r} is not a Cloud TPU slice; valid names are "
                            f"{', '.join(valid_names())} (v5litepod-N is v5e-N)")
    return Topology(name, generation, generation.grids[int(size)], slices)


@contextlib.contextmanager
def _quiet_stderr():
    """Silences what libtpu prints at C level while it describes a topology with no TPU
    attached (accelerator-type and worker-hostname warnings)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
