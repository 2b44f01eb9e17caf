"""Multislice meshes: the data axis spans slices over DCN, every other axis stays in a slice."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import parallel


@dataclasses.dataclass(frozen=True)
class SliceDevice:
    """A simulated CPU device that reports which slice it belongs to, as TPU devices do."""

    device: jax.Device
    slice_index: int

    @property
    def platform(self):
        return self.device.platform

    @property
    def device_kind(self):
        return self.device.device_kind


def two_slices():
    devices = jax.devices()[:8]
    # Interleave the slices in the device list, so that grouping has to be by slice_index.
    return [SliceDevice(d, i % 2) for i, d in enumerate(devices)]


def test_each_data_half_is_one_whole_slice():
    grid = parallel.device_grid((4, 2, 1, 1, 1), slices=2, devices=two_slices())
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    assert grid.shape == (4, 2, 1, 1, 1)
    assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()
    ids = sorted(d.device.id for d in grid.flat)
    assert ids == sorted(d.id for d in jax.devices()[:8])


def test_axes_other_than_data_never_cross_slices():
    grid = parallel.device_grid((2, 2, 2, 1, 1), slices=2, devices=two_slices())
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    for data_index in range(2):
        assert len(set(slice_of[data_index].flat)) == 1


def test_single_slice_mesh_keeps_every_device_once():
    config = config_lib.Config(mesh=config_lib.MeshConfig(data=2, fsdp=2, tensor=2))
    mesh = parallel.make_mesh(config)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1, "context": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_slices_must_divide_the_data_axis():
    config = config_lib.Config(mesh=config_lib.MeshConfig(data=2, fsdp=4, slices=4))
    with pytest.raises(config_lib.ConfigError, match="mesh.slices"):
        parallel.make_mesh(config)


def test_slices_that_the_devices_do_not_have_fail_clearly():
    # One process of simulated CPU devices is one slice.
    config = config_lib.Config(mesh=config_lib.MeshConfig(data=4, fsdp=2, slices=2))
    with pytest.raises(config_lib.ConfigError, match="mesh.slices"):
        parallel.make_mesh(config)
