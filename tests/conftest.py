"""Eight simulated CPU devices, set before JAX is imported, so every mesh really shards.

Datasets the tests build (the offline reasoning corpus) go to a temporary TFDS data_dir of
this session, never into the user's own."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="jaxllm-tfds-")
