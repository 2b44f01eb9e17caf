"""Tiny pretraining runs shared by the checkpoint and loop tests, and the compilation cache
that lets every run of one config compile once per test session."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import jax

from helpers import tiny_model
from jaxllm import Config, DataConfig, MeshConfig, TrainConfig
from jaxllm.config import CheckpointConfig
from jaxllm.train.metrics import read_jsonl

STEPS = 7


def run_config(workdir, mesh=MeshConfig(data=8), every: int = 3, resume_step=None,
               **train) -> Config:
    """STEPS steps of the tiny model on arithmetic, logging every step, without evaluation."""
    train = dict(steps=STEPS, batch_size=8, seq_len=32, warmup_steps=2, log_every=1,
                 eval_every=0, peak_flops=1e9) | train
    return Config(
        model=tiny_model(),
        mesh=mesh,
        data=DataConfig(source="arithmetic"),
        train=TrainConfig(**train),
        checkpoint=CheckpointConfig(every=every, keep=2, resume_step=resume_step),
        workdir=str(workdir),
    )


def quiet(line: str) -> None:
    """A log callback that discards the run's log lines."""


def losses(history: list[dict]) -> list[float]:
    return [record["loss"] for record in history]


def logged_steps(workdir) -> list[int]:
    return [r["step"] for r in read_jsonl(Path(workdir) / "metrics.jsonl") if "loss" in r]


def saved_steps(workdir) -> list[int]:
    """The steps of the complete checkpoints: orbax renames a finished save to its step."""
    names = [path.name for path in (Path(workdir) / "checkpoints").iterdir()]
    return sorted(int(name) for name in names if name.isdigit())


@contextlib.contextmanager
def compilation_cache(directory: Path) -> Iterator[dict[str, str]]:
    """JAX's persistent compilation cache in `directory`, for every executable however fast
    it compiled. Yields the same settings as environment variables, for subprocesses."""
    options = {
        "jax_compilation_cache_dir": str(directory),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    previous = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    try:
        yield {name.upper(): str(value) for name, value in options.items()}
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
