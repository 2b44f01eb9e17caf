"""What every training phase shares: set up, resume, step until done or preempted, save.

A phase (pretraining, GRPO, ...) supplies one function, `build(run) -> step`, called once the
run is set up. `step(state, number, final=...)` takes one step of that phase (its batches,
its update, its metrics and log lines) and returns the new state and the step's record for
the run's history, or None. The scaffold owns the rest:

- validation (the tokenizer against the model too), the mesh, the model, the optimizer and
  the initial state;
- resuming from the workdir's checkpoints, else starting from `config.init_from`'s weights;
- the metrics writer and the progress bar;
- preemption: SIGTERM in a single process, the hosts' agreed step in a multi-host run;
- checkpoints every `checkpoint.every` steps and at the step the run stops at;
- closing everything, whatever happens.
"""

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.data import checked_tokenizer
from jaxllm.nn import Transformer
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.checkpoint import Checkpointer, checkpointer
from jaxllm.train.metrics import MetricsWriter
from jaxllm.train.optimizer import make_optimizer, split_trainable
from jaxllm.train.preemption import stop_on_sigterm
from jaxllm.train.progress import Progress
from jaxllm.train.run import restore_weights
from jaxllm.train.state import TrainState, init_state

Log = Callable[[str], None]


@dataclasses.dataclass
class Run:
    """A phase's run, set up and resumed: what its `build` function may use."""

    config: config_lib.Config
    mesh: Mesh
    model: Transformer
    tx: optax.GradientTransformation
    state: TrainState  # initial, resumed or loaded from `config.init_from`
    shardings: TrainState  # of `state`
    start: int  # the step the run resumes after; 0 for a new run
    writer: MetricsWriter
    progress: Progress
    cleanup: contextlib.ExitStack  # a phase's own resources close with the run's
    log: Log


class Step(Protocol):
    """One step of a phase: the new state and the step's record for the history, or None.
    `final` is true for the last step the run takes."""

    def __call__(self, state: TrainState, number: int, *, final: bool
                 ) -> tuple[TrainState, dict | None]: ...


def load_weights(workdir: str, state: TrainState, config: config_lib.Config,
                 tx: optax.GradientTransformation) -> TrainState:
    """`state` with the params (and MoE biases) of the latest checkpoint in `workdir`, a fresh
    optimizer state and step 0. The checkpoint's model must equal `config.model`."""
    restored = restore_weights(workdir, state, config)
    shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
    opt_state = jax.jit(tx.init, out_shardings=shardings)
    trainable, _ = split_trainable(restored.params, config.model)
    return restored.replace(step=jnp.zeros_like(restored.step), opt_state=opt_state(trainable))


def initial_weights(run: Run):
    """(params, moe_bias) the run started from, e.g. a KL or DPO reference: a copy of a new
    run's initial state; on resume, `init_from`'s weights loaded again, else the seeded
    initialisation made again."""
    config = run.config
    if run.start == 0:
        return jax.tree.map(jnp.copy, (run.state.params, run.state.moe_bias))
    if config.init_from is not None:  # into a copy: a restore frees its target's arrays
        fields = {f.name: getattr(run.state, f.name) for f in dataclasses.fields(run.state)
                  if f.name != "opt_state"}
        state = restore_weights(config.init_from,
                                run.state.replace(**jax.tree.map(jnp.copy, fields)), config)
    else:
        state, _ = init_state(run.model, run.tx, config.train.seq_len, run.mesh,
                              jax.random.key(config.train.seed))
    return state.params, state.moe_bias


def run_phase(
    config: config_lib.Config,
    *,
    build: Callable[[Run], Step],
    seq_len: int,
    unit: str = "step",
    log: Log = print,
    stop_after: int | None = None,
) -> list[dict]:
    """Runs `build(run)`'s step from the run's start up to `config.train.steps`; returns the
    records the steps returned.

    `seq_len` sizes the initial state; `unit` names a step in log lines ("RL step"). After a
    SIGTERM (or the hosts' agreed preemption step), or after step `stop_after`, the run saves
    at the step it reached and returns.
    """
    config = config_lib.validate(config)
    checked_tokenizer(config)
    with contextlib.ExitStack() as cleanup:
        checkpoints = checkpointer(config)
        if checkpoints is not None:
            cleanup.callback(checkpoints.close)
        run = _start(config, checkpoints, seq_len=seq_len, unit=unit, log=log, cleanup=cleanup)
        if run.start >= config.train.steps:
            log(f"nothing to do: the run already reached train.steps={config.train.steps}")
            return []
        cleanup.enter_context(parallel.use_mesh(run.mesh))
        sigterm = cleanup.enter_context(stop_on_sigterm())
        step = build(run)
        return _loop(run, step, checkpoints, sigterm=sigterm.is_set, unit=unit,
                     stop_after=stop_after)


def _start(config: config_lib.Config, checkpoints: Checkpointer | None, *, seq_len: int,
           unit: str, log: Log, cleanup: contextlib.ExitStack) -> Run:
    """Builds the run's state: resumed from its checkpoints, or from `config.init_from`."""
    if checkpoints is not None:
        checkpoints.resume_step(config)  # a bad checkpoint fails before the state is built
    mesh = parallel.make_mesh(config)
    model, tx = Transformer(config.model), make_optimizer(config.train)
    state, shardings = init_state(model, tx, seq_len, mesh, jax.random.key(config.train.seed))
    start = 0
    if checkpoints is not None:
        state, start = checkpoints.resume(state, config)
    if start:
        log(f"resumed from the checkpoint at {unit} {start} in {checkpoints.directory}")
    elif config.init_from is not None:
        state = load_weights(config.init_from, state, config, tx)
        log(f"starting from the weights in {config.init_from}")
    if config.workdir:
        workdir_lib.save_config(config, config.workdir)
    writer = MetricsWriter(config.workdir, start)
    cleanup.callback(writer.close)
    progress = Progress(config.train.steps, start, log)
    cleanup.callback(progress.close)
    return Run(config=config, mesh=mesh, model=model, tx=tx, state=state, shardings=shardings,
               start=start, writer=writer, progress=progress, cleanup=cleanup, log=log)


def _loop(run: Run, step: Step, checkpoints: Checkpointer | None, *,
          sigterm: Callable[[], bool], unit: str, stop_after: int | None) -> list[dict]:
    """Steps until the last step, a preemption or `stop_after`, saving as configured."""
    state, history, last = run.state, [], run.config.train.steps
    for number in range(run.start + 1, last + 1):
        preempted = sigterm() or (
            checkpoints is not None and checkpoints.reached_preemption(number)
        )
        stopping = preempted or number == stop_after
        final = stopping or number == last
        state, record = step(state, number, final=final)
        if record is not None:
            history.append(record)
        run.progress.advance(number)
        if checkpoints is not None:
            checkpoints.save(number, state, run.config, force=final)
        if stopping:
            reason = "a preemption notice (SIGTERM)" if preempted else "stop_after"
            run.progress.write(f"stopped at {unit} {number} on {reason}")
            break
    return history
