"""The pretraining loop: build everything from a Config, resume from the workdir's latest
checkpoint, then step, log, evaluate and checkpoint until the last step or a preemption."""

import functools
import itertools
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.data import make_source
from jaxllm.nn.context_order import permutation, to_context_order
from jaxllm.nn.vision import patch_index
from jaxllm.train import flops
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.evaluate import evaluate, jit_eval_step
from jaxllm.train.metrics import format_eval_line
from jaxllm.train.optimizer import learning_rate_schedule
from jaxllm.train.scaffold import Run, Step, run_phase
from jaxllm.train.state import count_params
from jaxllm.train.step import jit_train_step


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, batch_size: int) -> dict:
    """The global [batch_size, ...] arrays, assembled from each process's own rows and laid
    out by `parallel.batch_shardings`."""
    shardings = parallel.batch_shardings(mesh, local)
    return {
        key: jax.make_array_from_process_local_data(
            shardings[key], rows, (batch_size, *rows.shape[1:]))
        for key, rows in local.items()
    }


def context_ordered(batches: Iterator[dict], mesh: Mesh, order: str, *,
                    patch_token_id: int | None = None) -> Iterator[dict]:
    """Host batches with the sequence axis of every [B, S] array in `order` over the mesh's
    context axis (`jaxllm.nn.context_order`); unchanged without context parallelism.

    Positions and segment ids move with the tokens, and the loss is a sum over tokens, so
    nothing needs putting back. A batch with images keeps its `patches` in row order and gains
    `patch_index` (`jaxllm.nn.vision.patch_index` of the original order, with the tokens
    of `patch_token_id`), moved with the tokens.
    """
    n = mesh.shape[parallel.CONTEXT]
    if n == 1:
        return batches

    def reorder(batch: dict) -> dict:
        per_token = {key: x for key, x in batch.items() if key != "patches"}
        if "patches" in batch:
            per_token["patch_index"] = patch_index(batch["inputs"], patch_token_id)
        perm = permutation(order, batch["inputs"].shape[1], n)
        return {**batch, **to_context_order(per_token, perm)}

    return map(reorder, batches)


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


def _eval_set(config: config_lib.Config, mesh: Mesh) -> list[dict]:
    """The fixed validation batches of every evaluation; none if evaluation is off."""
    cfg = config.train
    if not cfg.eval_every or config.data.eval_split is None:
        return []
    source = make_source(config, split=config.data.eval_split)
    batches = itertools.islice(source.batches(cfg.batch_size, cfg.seq_len), cfg.eval_batches)
    batches = context_ordered(batches, mesh, config.mesh.context_order,
                              patch_token_id=config.model.vision.patch_token_id)
    return [global_batch(batch, mesh, cfg.batch_size) for batch in batches]


def pretrain(
    config: config_lib.Config, log: Callable[[str], None] = print, stop_after: int | None = None,
    source=None,
) -> list[dict]:
    """Trains `config.model` up to step `config.train.steps`; returns this run's logged metrics.

    With a workdir, the run resumes from its latest complete checkpoint (or from
    `checkpoint.resume_step`) and saves every `checkpoint.every` steps and at the end. On
    SIGTERM, or after step `stop_after`, it saves at the step it reached and returns.
    `source` (default `make_source(config)`) gives the training batches.
    """
    build = functools.partial(lm_step, source=source)
    return run_phase(config, build=build, seq_len=config.train.seq_len, log=log,
                     stop_after=stop_after)


def lm_step(run: Run, *, source=None, loss=None, frozen: tuple = ()) -> Step:
    """Compiles the train step on the run's first batch; returns the phase's step, which
    trains on `source`'s batches (default `make_source(run.config)`).

    `loss` and `frozen` go to `jit_train_step`: the default is pretraining's loss; a
    distillation loss reads a teacher's params from `frozen`, arrays on the run's mesh.
    """
    config, cfg, mesh = run.config, run.config.train, run.mesh
    position = run.start  # batches consumed: one per step
    source = make_source(config) if source is None else source
    batches = source.batches(cfg.batch_size, cfg.seq_len, start=position)
    batches = context_ordered(batches, mesh, config.mesh.context_order,
                              patch_token_id=config.model.vision.patch_token_id)
    eval_set = _eval_set(config, mesh)
    meter = _Meter(config, count_params(run.state.params), mesh, run.log)
    trace = run.cleanup.enter_context(_Trace(cfg, config.workdir))

    batch = global_batch(next(batches), mesh, cfg.batch_size)
    batch_shardings = {key: x.sharding for key, x in batch.items()}
    compile_start = time.perf_counter()
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    train_step = jit_train_step(
        run.model, run.tx, cfg, learning_rate_schedule(cfg), mesh, run.shardings, loss=loss,
        frozen_shardings=frozen_shardings, batch_shardings=batch_shardings,
    ).lower(run.state, batch, *frozen).compile()
    eval_step = jit_eval_step(run.model, mesh, run.shardings, batch_shardings)
    run.log(f"compiled the train step in {time.perf_counter() - compile_start:.1f} s")
    meter.restart(run.start)
    previous_metrics = None

    def step(state, number: int, *, final: bool):
        nonlocal batch, previous_metrics
        trace.before(number)
        state, metrics = train_step(state, batch, *frozen)
        trace.after(number, metrics)
        if not final:  # the host reads the next batch while the device computes this step
            batch = global_batch(next(batches), mesh, cfg.batch_size)
        # The host stays one step ahead of the devices, not a whole logging interval: host
        # memory stays bounded, and XLA:CPU's collectives deadlock with dozens of steps queued.
        jax.block_until_ready(previous_metrics)
        previous_metrics = metrics
        record = None
        if number == run.start + 1 or number % cfg.log_every == 0 or final:
            record = meter.record(metrics, number)
            run.writer.write(record)
            run.progress.report(record)
        if eval_set and number % cfg.eval_every == 0:
            evaluation = {"step": number, **evaluate(eval_step, state, eval_set)}
            run.writer.write(evaluation)
            run.progress.write(format_eval_line(evaluation))
            meter.restart(number)
        return state, record

    return step
