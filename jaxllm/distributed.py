"""Multi-process start-up: one JAX process per host, joined into one set of devices."""

import jax

from jaxllm._platforms import has_tpu


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Calls `jax.distributed.initialize` when this run spans several processes, or runs on
    a TPU VM.

    With an explicit coordinator ("host:port"), process count and id (GPU clusters, local
    CPU tests), those are used, and CPU collectives go through gloo. On a TPU VM JAX detects
    the hosts of the slice (or slices) from the VM's metadata, one host included: a gcloud
    TPU VM's environment names no workers, so every TPU VM initialises, as MaxText does.
    Anywhere else a single process needs nothing and is left alone. Call it before anything
    touches a device.
    """
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator needs both num_processes and process_id")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif has_tpu():
        jax.distributed.initialize()
