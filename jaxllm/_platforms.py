"""Keeps an installed libtpu from probing for a TPU on machines that have none.

With libtpu installed (`pip install jaxllm[tpu]`), JAX initialises its TPU backend on first
use and, on a machine without a TPU, prints libtpu's errors before falling back to the CPU.
jaxllm's ahead-of-time compilation for TPU slices needs libtpu but no TPU backend, so where
no TPU device file exists and JAX_PLATFORMS is unset, this names the platforms JAX should
use instead. It must run before JAX initialises a backend.
"""

import glob
import os
import sys


def has_tpu() -> bool:
    """Whether this machine has a TPU attached (a TPU VM)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                or os.environ.get("TPU_ACCELERATOR_TYPE"))


def skip_tpu_probe_without_tpu() -> None:
    """Sets JAX_PLATFORMS to "cuda,cpu" (NVIDIA devices present) or "cpu" when it is unset
    and no TPU is attached; leaves any other machine, and any choice of the user's, alone."""
    if "JAX_PLATFORMS" in os.environ or has_tpu() or glob.glob("/dev/kfd"):
        return
    platforms = "cuda,cpu" if glob.glob("/dev/nvidia[0-9]*") else "cpu"
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:  # imported first: its config has read the environment already
        sys.modules["jax"].config.update("jax_platforms", platforms)
