"""Reading and writing safetensors checkpoints, one tensor at a time.

Only safetensors and JSON are read: pickled PyTorch files (`*.bin`, `*.pt`, `*.pth`) are
refused, since unpickling runs arbitrary code.
"""

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxllm.convert.hf_config import ConversionError

INDEX = "model.safetensors.index.json"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def read_json(path: Path) -> dict:
    """A JSON file, or ConversionError naming it if it is missing."""
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    return json.loads(path.read_text())


class SafetensorsReader:
    """The tensors of an HF checkpoint directory, read lazily by name.

    Uses `model.safetensors.index.json` when present, else every `*.safetensors` file.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if (self.directory / INDEX).is_file():
            weight_map = read_json(self.directory / INDEX)["weight_map"]
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for file in sorted(self.directory.glob("*.safetensors")):
                with safe_open(file, framework="numpy") as f:
                    self.files.update({name: file for name in f.keys()})
        if not self.files:
            pickled = [p.name for pattern in PICKLED for p in self.directory.glob(pattern)]
            hint = (f" It holds pickled PyTorch weights ({', '.join(sorted(pickled))}), which are "
                    "never read because unpickling can run arbitrary code. Convert them once, "
                    "in an environment you trust, with transformers: "
                    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
                    "safe_serialization=True)") if pickled else ""
            raise ConversionError(f"{self.directory} holds no safetensors weights.{hint}")
        self.read: set[str] = set()  # the names read so far

    def names(self) -> set[str]:
        return set(self.files)

    def _file(self, name: str) -> Path:
        if name not in self.files:
            raise ConversionError(f"tensor {name!r} is missing from the checkpoint in "
                                  f"{self.directory}")
        return self.files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, read from the file header only."""
        with safe_open(self._file(name), framework="numpy") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` in float32; bfloat16 goes through JAX, which numpy lacks."""
        file = self._file(name)
        with safe_open(file, framework="numpy") as f:
            bf16 = f.get_slice(name).get_dtype() == "BF16"
            tensor = None if bf16 else f.get_tensor(name)
        if bf16:
            with safe_open(file, framework="flax") as f:
                tensor = f.get_tensor(name).astype("float32")
        self.read.add(name)
        return np.asarray(tensor, np.float32)


def write_shards(tensors: Iterable[tuple[str, np.ndarray]], directory: str | Path,
                 max_shard_bytes: int = 4 << 30) -> None:
    """Writes (name, array) pairs as safetensors shards of at most about `max_shard_bytes`,
    plus `model.safetensors.index.json`; only one shard is held in memory at a time."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards, current, size, total = [], {}, 0, 0

    def flush():
        path = directory / f"shard-{len(shards):05d}.safetensors"
        save_file(current, path, metadata={"format": "pt"})
        shards.append((path, list(current)))

    for name, array in tensors:
        if current and size + array.nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = np.ascontiguousarray(array)
        size += array.nbytes
        total += array.nbytes
    flush()
    weight_map = {}
    for i, (path, names) in enumerate(shards):
        final = directory / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        path.rename(final)
        weight_map.update({name: final.name for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
