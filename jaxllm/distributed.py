"""Multi-process start-up: one JAX process per host, joined into one set of devices."""

import os

import jax


def is_multihost_tpu() -> bool:
    """True on a TPU VM that is one of several workers (a pod slice or multislice)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or int(os.environ.get("MEGASCALE_NUM_SLICES", "1")) > 1


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Calls `jax.distributed.initialize` when this run spans several processes.

    With an explicit coordinator ("host:port"), process count and id (GPU clusters, local
    CPU tests), those are used, and CPU collectives go through gloo. On a multi-host TPU VM
    JAX detects the topology itself. A single process needs nothing and is left alone.
    Call it before anything touches a device.
    """
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator needs both num_processes and process_id")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif is_multihost_tpu():
        jax.distributed.initialize()
