"""The platform a trace targets, so that kernels are chosen for the devices that will run them."""

import jax


def target_platform() -> str:
    """"tpu", "gpu" or "cpu": the platform of the current mesh's devices (`jax.set_mesh`), else
    the default backend's.

    Under a mesh of TPU topology devices on a CPU machine (ahead-of-time compilation) this is
    "tpu", so TPU kernels are traced and compiled, not the local backend's.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return {"cuda": "gpu", "rocm": "gpu"}.get(mesh.abstract_device.platform,
                                                  mesh.abstract_device.platform)
    return jax.default_backend()
