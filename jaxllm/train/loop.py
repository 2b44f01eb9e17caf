"""The pretraining loop: build everything from a Config, resume from the workdir's latest
checkpoint, then step, log, evaluate and checkpoint until the last step or a preemption."""

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.data import make_source
from jaxllm.nn import Transformer
from jaxllm.nn.context_order import permutation, to_context_order
from jaxllm.train import flops
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.checkpoint import checkpointer
from jaxllm.train.evaluate import evaluate, jit_eval_step
from jaxllm.train.metrics import MetricsWriter, format_eval_line
from jaxllm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxllm.train.preemption import stop_on_sigterm
from jaxllm.train.progress import Progress
from jaxllm.train.state import count_params, init_state
from jaxllm.train.step import jit_train_step


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict:
    """The global [batch_size, ...] arrays, assembled from each process's own rows."""
    return {
        key: jax.make_array_from_process_local_data(sharding, rows, (batch_size, *rows.shape[1:]))
        for key, rows in local.items()
    }


def context_ordered(batches: Iterator[dict], mesh: Mesh, order: str) -> Iterator[dict]:
    """Host batches with the sequence axis of every array in `order` over the mesh's context
    axis (`jaxllm.nn.context_order`); unchanged without context parallelism.

    Positions and segment ids move with the tokens, and the loss is a sum over tokens, so
    nothing needs putting back.
    """
    n = mesh.shape["context"]
    if n == 1:
        return batches
    return (to_context_order(b, permutation(order, b["inputs"].shape[1], n)) for b in batches)


class _Trace:
    """A `jax.profiler` trace of steps profile_start .. profile_start + profile_steps - 1,
    in `workdir/profile` (traced into the local mirror of a remote workdir, then copied)."""

    def __init__(self, cfg: config_lib.TrainConfig, workdir: str | None):
        self.first, self.last = cfg.profile_start, cfg.profile_start + cfg.profile_steps - 1
        self.workdir = workdir
        self.directory = str(workdir_lib.local_dir(workdir) / "profile") if workdir else None
        self.enabled, self.active = cfg.profile_steps > 0, False

    def before(self, step: int) -> None:
        if self.enabled and step == self.first:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step == self.last:
            self.close(outputs)

    def close(self, outputs=None) -> None:
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            workdir_lib.sync(self.workdir)

    def __enter__(self) -> "_Trace":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _Meter:
    """Turns a log step's metrics into a record with step time, tokens/s and MFU."""

    def __init__(self, config: config_lib.Config, num_params: int, mesh: Mesh, log):
        cfg = config.train
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.flops_per_token = flops.train_flops_per_token(config.model, num_params, cfg.seq_len)
        if cfg.peak_flops:
            peak, source = cfg.peak_flops, "train.peak_flops"
        else:
            peak, source = flops.peak_flops_per_device(config.model.dtype)
        self.peak = peak * mesh.size
        log(f"{num_params:,} parameters on mesh {dict(mesh.shape)}; "
            f"{self.flops_per_token / 1e6:.1f} MFLOPs/token; peak {peak / 1e9:.1f} "
            f"GFLOP/s/device ({source})")

    def restart(self, step: int) -> None:
        """Times the next steps from now: after compiling, evaluating or resuming."""
        self.time, self.step = time.perf_counter(), step

    def record(self, metrics, step: int) -> dict:
        """The step's metrics as floats, with the mean step time since the last record."""
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(record["loss"]):
            raise FloatingPointError(f"loss is {record['loss']} at step {step}")
        step_time = (time.perf_counter() - self.time) / (step - self.step)
        tokens_per_s = self.tokens_per_step / step_time
        self.restart(step)
        return {
            **record,
            "step": step,
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak,
        }


def _eval_set(config: config_lib.Config, sharding: NamedSharding) -> list[dict]:
    """The fixed validation batches of every evaluation; none if evaluation is off."""
    cfg = config.train
    if not cfg.eval_every or config.data.eval_split is None:
        return []
    source = make_source(config, split=config.data.eval_split)
    batches = itertools.islice(source.batches(cfg.batch_size, cfg.seq_len), cfg.eval_batches)
    batches = context_ordered(batches, sharding.mesh, config.mesh.context_order)
    return [global_batch(batch, sharding, cfg.batch_size) for batch in batches]


def pretrain(
    config: config_lib.Config, log: Callable[[str], None] = print, stop_after: int | None = None
) -> list[dict]:
    """Trains `config.model` up to step `config.train.steps`; returns this run's logged metrics.

    With a workdir, the run resumes from its latest complete checkpoint (or from
    `checkpoint.resume_step`) and saves every `checkpoint.every` steps and at the end. On
    SIGTERM, or after step `stop_after`, it saves at the step it reached and returns.
    """
    config = config_lib.validate(config)
    cfg = config.train
    mesh = parallel.make_mesh(config)
    with contextlib.ExitStack() as cleanup:
        checkpoints = checkpointer(config)
        if checkpoints is not None:
            cleanup.callback(checkpoints.close)
            checkpoints.resume_step(config)  # a bad checkpoint fails before the state is built
        model, tx = Transformer(config.model), make_optimizer(cfg)
        state, state_shardings = init_state(model, tx, cfg.seq_len, mesh, jax.random.key(cfg.seed))
        meter = _Meter(config, count_params(state.params), mesh, log)
        position = 0
        if checkpoints is not None:
            state, position = checkpoints.resume(state, config)
        start = int(state.step)
        if start:
            log(f"resumed from the checkpoint at step {start} in {checkpoints.directory}")
        if config.workdir:
            workdir_lib.save_config(config, config.workdir)
        if start >= cfg.steps:
            log(f"nothing to do: the run already reached train.steps={cfg.steps}")
            return []

        batch_sharding = parallel.batch_sharding(mesh)
        batches = make_source(config).batches(cfg.batch_size, cfg.seq_len, start=position)
        batches = context_ordered(batches, mesh, config.mesh.context_order)
        eval_set = _eval_set(config, batch_sharding)
        writer = MetricsWriter(config.workdir, start)
        cleanup.callback(writer.close)
        trace = cleanup.enter_context(_Trace(cfg, config.workdir))
        cleanup.enter_context(parallel.use_mesh(mesh))
        sigterm = cleanup.enter_context(stop_on_sigterm())

        batch = global_batch(next(batches), batch_sharding, cfg.batch_size)
        compile_start = time.perf_counter()
        step_fn = jit_train_step(
            model, tx, cfg, learning_rate_schedule(cfg), mesh, state_shardings
        ).lower(state, batch).compile()
        eval_step = jit_eval_step(model, mesh, state_shardings)
        log(f"compiled the train step in {time.perf_counter() - compile_start:.1f} s")

        progress = Progress(cfg.steps, start, log)
        cleanup.callback(progress.close)

        history = []
        meter.restart(start)
        for step in range(start + 1, cfg.steps + 1):
            trace.before(step)
            state, metrics = step_fn(state, batch)
            trace.after(step, metrics)
            preempted = sigterm.is_set() or (
                checkpoints is not None and checkpoints.reached_preemption(step)
            )
            stopping = preempted or step == stop_after
            final = stopping or step == cfg.steps
            if not final:
                batch = global_batch(next(batches), batch_sharding, cfg.batch_size)
            if step == start + 1 or step % cfg.log_every == 0 or final:
                history.append(meter.record(metrics, step))
                writer.write(history[-1])
                progress.report(history[-1])
            progress.advance(step)
            if checkpoints is not None:
                checkpoints.save(step, state, config, force=final)
            if eval_set and step % cfg.eval_every == 0:
                record = {"step": step, **evaluate(eval_step, state, eval_set)}
                writer.write(record)
                progress.write(format_eval_line(record))
                meter.restart(step)
            if stopping:
                reason = "a preemption notice (SIGTERM)" if preempted else "stop_after"
                progress.write(f"stopped at step {step} on {reason}")
                break
    return history
