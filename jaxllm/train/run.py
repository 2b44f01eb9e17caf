"""A finished (or running) run, loaded back from its workdir for inference or a next phase."""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
from etils import epath

from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.nn import Transformer
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.optimizer import make_optimizer
from jaxllm.train.state import TrainState, abstract_state


def read_config(workdir: str | Path) -> config_lib.Config:
    """The resolved config a run saved in `workdir/config.json`, local or gs://."""
    path = epath.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {workdir} the workdir of a run?")
    return config_lib.from_dict(json.loads(path.read_text()))


def restore_weights(workdir: str | Path, state: TrainState, config: config_lib.Config
                    ) -> TrainState:
    """`state` (arrays, or an `abstract_state`) with the params, MoE biases, step and rng of
    the latest checkpoint in `workdir`, resharded onto its layout. The optimizer state is not
    read: it stays as `state` holds it."""
    checkpoints = Checkpointer(epath.Path(workdir) / "checkpoints", config.checkpoint)
    try:
        step = checkpoints.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir} holds no checkpoint")
        return checkpoints.restore_weights(step, state, config)
    finally:
        checkpoints.close()


def load_run(workdir: str | Path, overrides: Sequence[str] = ()
             ) -> tuple[config_lib.Config, Transformer, TrainState]:
    """(config, model, state) of the latest checkpoint in `workdir`: on one device whatever
    mesh the run trained on, or on the mesh that `overrides` set (e.g. "mesh.fsdp=8").
    The state holds no optimizer state (`opt_state` is None)."""
    config = read_config(workdir)
    if overrides:
        config = config_lib.apply_overrides(config, list(overrides))
        mesh = parallel.make_mesh(config)
    else:
        config = dataclasses.replace(config, mesh=config_lib.MeshConfig(data=1))
        mesh = parallel.make_mesh(config, jax.devices()[:1])
    model = Transformer(config.model)
    target = abstract_state(model, make_optimizer(config.train), 8, mesh)
    return config, model, restore_weights(workdir, target, config).replace(opt_state=None)
