"""Eight simulated CPU devices, set before JAX is imported, so every mesh really shards.

Datasets the tests build (the offline reasoning corpus) go to a temporary TFDS data_dir of
this session, never into the user's own.

Compiled executables go to a persistent compilation cache that the pytest-xdist workers of
one session share (named by xdist's test-run id), so tests that
compile the same program (the same tiny model's init or train step) compile it once."""

import os
import tempfile

# The tests' programs are tiny and mostly run a few times: LLVM's optimisation passes cost
# them more compile time than they save at run time, so the tests skip them.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile for TPU topologies through libtpu in several processes at once (xdist workers).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="jaxllm-tfds-")
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())  # same in every worker
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"jaxllm-jit-cache-{_run}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_collection_modifyitems(items):
    """Slow tests first, so the files that hold them are handed out first (each file runs in
    one worker): the two workers then end on short files, not one on a long one."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
