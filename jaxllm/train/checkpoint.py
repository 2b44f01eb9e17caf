"""Orbax checkpoints of the train state, the data position and the config.

Orbax writes each step into a temporary directory and renames it once every file is
complete, so a process killed during a save leaves nothing that `latest_step` would pick.
Restoring targets the current mesh's shardings, so a run may resume on other axis sizes.
"""

import dataclasses
import sys

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxllm import config as config_lib
from jaxllm.nn import lora as lora_lib
from jaxllm.train.state import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored. The message names the step and the reason."""


def _model_differences(saved: dict, current: dict, prefix: str = "model") -> list[str]:
    """'model.field: saved in the checkpoint, current now' for each field that differs."""
    differences = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += _model_differences(old, new, f"{prefix}.{key}")
        elif old != new:
            differences.append(f"{prefix}.{key}: {old!r} in the checkpoint, {new!r} now")
    return differences


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: the actual reason, such as a short read."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _drop_closed_loop_errors() -> None:
    """Keeps the reads a failed restore abandoned quiet: tensorstore finishes them after orbax
    has closed the restore's event loop, and each hands its result to that loop, which raises
    "Event loop is closed" as an unraisable exception. Drops those, and only those, for the
    rest of the process; any other unraisable exception goes to the hook set before. Set
    before a read, since the first abandoned read can end before its error propagates."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_errors", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook


def _abstract(state):
    """Shapes, dtypes and shardings of `state`'s arrays: the target layout of a restore."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


class Checkpointer:
    """Async saves every `cfg.every` steps into `directory`, keeping the newest `cfg.keep`.

    Each checkpoint holds two items: "state" (the whole `TrainState`) and "run" (JSON: the
    data position, which is the number of batches consumed, and the run's config).
    """

    def __init__(self, directory: str | epath.Path, cfg: config_lib.CheckpointConfig):
        self.cfg = cfg
        path = epath.Path(directory)
        self.directory = path if path.is_absolute() else path.absolute()  # gs:// is absolute
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep,
                enable_async_checkpointing=True,
                cleanup_tmp_directories=True,
            ),
            item_names=("state", "run"),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(
        self, step: int, state: TrainState, config: config_lib.Config, force: bool = False
    ) -> bool:
        """Starts an async save of `state` at `step` if it is a multiple of `every`, or `force`.

        Returns once the arrays are copied off the devices, so `state` may then be donated.
        """
        if not force and step % self.cfg.every:
            return False
        run = {"data_position": step, "config": config_lib.to_dict(config)}
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(run)),
            force=True,
        )
        return True

    def reached_preemption(self, step: int) -> bool:
        """Whether a multi-host run's hosts agreed to stop at `step` after a preemption notice."""
        return self.manager.reached_preemption(step)

    def _read(self, step: int, read):
        """`read()`, its errors raised as CheckpointError naming the step and the reason."""
        _drop_closed_loop_errors()
        try:
            return read()
        except Exception as error:  # orbax wraps tensorstore read errors in a bare Exception
            root = _root_cause(error)
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} cannot be restored: "
                f"{type(root).__name__}: {root}"
            ) from error

    def _restore_item(self, step: int, **args):
        return self._read(step, lambda: self.manager.restore(step, args=ocp.args.Composite(**args)))

    def _saved_config(self, step: int) -> dict:
        """The run's config that checkpoint `step` was saved with, as a dict."""
        return self._restore_item(step, run=ocp.args.JsonRestore()).run["config"]

    def _saved_model(self, step: int) -> config_lib.ModelConfig:
        """The model config checkpoint `step` was saved with."""
        saved = self._saved_config(step)["model"]
        try:  # fields added since the save take their defaults
            return config_lib.from_dict({"model": saved}).model
        except (TypeError, config_lib.ConfigError) as error:
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} holds a model config this "
                f"version cannot read: {error}"
            ) from None

    def check_model(self, step: int, config: config_lib.Config, *, adapters: bool = True
                    ) -> None:
        """Raises CheckpointError, naming the fields, if `step` holds another model;
        `adapters=False` leaves the LoRA sections out of the comparison."""
        saved = self._saved_model(step)
        if not adapters:
            saved = dataclasses.replace(saved, lora=config.model.lora)
        differences = _model_differences(dataclasses.asdict(saved),
                                         dataclasses.asdict(config.model))
        if differences:
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} holds another model: "
                + "; ".join(differences)
            )

    def resume_step(self, config: config_lib.Config) -> int | None:
        """The step to resume from: `checkpoint.resume_step`, else the latest; None if none.

        A restart of a branch (the latest checkpoint is later than `resume_step` and was
        saved by a run with the same `resume_step`) resumes from the latest, so that the
        branch's own checkpoints are kept. Needs no state, so a run can check its checkpoint
        before building one.
        """
        steps = self.manager.all_steps()
        step, latest = self.cfg.resume_step, self.latest_step()
        if step is None or (latest is not None and latest > step and self._saved_config(
                latest).get("checkpoint", {}).get("resume_step") == step):
            step = latest
        if step is None:
            return None
        if step not in steps:
            raise CheckpointError(
                f"checkpoint.resume_step={step}: {self.directory} holds no checkpoint at that "
                f"step; it holds steps {sorted(steps)}"
            )
        self.check_model(step, config)
        return step

    def restore(
        self, step: int, state: TrainState, config: config_lib.Config
    ) -> tuple[TrainState, int]:
        """Restores `step` into the shapes and shardings of `state` (arrays, or
        `jax.ShapeDtypeStruct`s with shardings), resharding as needed.

        The arrays of `state` are freed first, so that memory never holds two states.
        Returns (the restored state, the data position).
        """
        self.check_model(step, config)
        fields = self._saved_fields(step, state)
        target = _abstract(fields)
        jax.tree.map(lambda x: x.delete() if isinstance(x, jax.Array) else None, fields)
        restored = self._restore_item(
            step, state=ocp.args.StandardRestore(target), run=ocp.args.JsonRestore()
        )
        return state.replace(**restored.state), restored.run["data_position"]

    def _saved_fields(self, step: int, state: TrainState) -> dict:
        """`state`'s fields by name, less the empty ones that checkpoint `step` lacks: a field
        added to the state since the save (such as `fp8_meta`) that this model leaves empty.
        A missing field that holds arrays stays, and the restore names it."""
        handler = ocp.StandardCheckpointHandler()
        saved = self._read(step, lambda: handler.metadata(self.directory / str(step) / "state"))
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
        return {name: value for name, value in fields.items()
                if name in saved or jax.tree.leaves(value)}

    def restore_weights(self, step: int, state: TrainState, config: config_lib.Config
                        ) -> TrainState:
        """`state` with the step, params, rng and MoE biases of checkpoint `step`, in the
        layout of `state`'s; the optimizer state is not read (about a third of the memory and
        reading of a whole restore) and stays as `state` holds it.

        A LoRA run may load a checkpoint without adapters (its base model, `init_from`): the
        adapters of `state` stay, with B zeroed so that the model is the base model.

        The arrays of those fields in `state` are freed first, as in `restore`: use only the
        returned state afterwards."""
        base_only = (config.model.active_lora is not None
                     and self._saved_model(step).active_lora is None)
        self.check_model(step, config, adapters=not base_only)
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
                  if f.name != "opt_state"}
        adapters = {}
        if base_only:
            adapters, fields["params"] = lora_lib.split(fields["params"])
        target = _abstract(fields)
        jax.tree.map(lambda x: x.delete() if isinstance(x, jax.Array) else None, fields)
        restored = self._restore_item(step, state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )).state
        if base_only:
            restored["params"] = lora_lib.join(lora_lib.identity(adapters), restored["params"])
        return state.replace(**restored)

    def resume(self, state: TrainState, config: config_lib.Config) -> tuple[TrainState, int]:
        """Restores `resume_step(config)`, or returns (state, 0) if there is none.

        The checkpoints after that step are deleted: the run branches there.
        Returns (state, data position).
        """
        step = self.resume_step(config)
        if step is None:
            return state, 0
        state, position = self.restore(step, state, config)
        for later in (s for s in self.manager.all_steps() if s > step):
            self.manager.delete(later)
        return state, position

    def close(self) -> None:
        """Waits for the pending save to finish and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def checkpointer(config: config_lib.Config) -> Checkpointer | None:
    """The run's checkpointer in `workdir/checkpoints`; None for a run without a workdir."""
    if config.workdir is None:
        return None
    return Checkpointer(epath.Path(config.workdir) / "checkpoints", config.checkpoint)

