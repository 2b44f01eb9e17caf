"""The pretraining loop: build everything from a Config, then step, log and report."""

import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.data import make_source
from jaxllm.nn import Transformer
from jaxllm.train import flops
from jaxllm.train.metrics import MetricsWriter, format_line
from jaxllm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxllm.train.state import count_params, init_state
from jaxllm.train.step import jit_train_step


def pretrain(config: config_lib.Config, log: Callable[[str], None] = print) -> list[dict]:
    """Trains `config.model` for `config.train.steps` steps; returns the logged metrics."""
    config = config_lib.validate(config)
    cfg = config.train
    mesh = parallel.make_mesh(config)
    source = make_source(config)
    model = Transformer(config.model)
    tx = make_optimizer(cfg)
    state, state_shardings = init_state(model, tx, cfg.seq_len, mesh, jax.random.key(cfg.seed))

    num_params = count_params(state.params)
    flops_per_token = flops.train_flops_per_token(config.model, num_params, cfg.seq_len)
    if cfg.peak_flops:
        peak, peak_source = cfg.peak_flops, "train.peak_flops"
    else:
        peak, peak_source = flops.peak_flops_per_device(config.model.dtype)
    log(f"{num_params:,} parameters on mesh {dict(mesh.shape)}; "
        f"{flops_per_token / 1e6:.1f} MFLOPs/token; peak {peak / 1e9:.1f} GFLOP/s/device "
        f"({peak_source})")
    if config.workdir:
        Path(config.workdir).mkdir(parents=True, exist_ok=True)
        config_lib.save(config, Path(config.workdir) / "config.json")
    writer = MetricsWriter(config.workdir)

    batches = source.batches(cfg.batch_size, cfg.seq_len)
    batch_sharding = parallel.batch_sharding(mesh)

    def next_batch():
        return jax.device_put(next(batches), batch_sharding)

    with parallel.use_mesh(mesh):
        batch = next_batch()
        start = time.perf_counter()
        step_fn = jit_train_step(
            model, tx, cfg, learning_rate_schedule(cfg), mesh, state_shardings
        ).lower(state, batch).compile()
        log(f"compiled the train step in {time.perf_counter() - start:.1f} s")

        history, last_time, last_step = [], time.perf_counter(), 0
        for step in range(1, cfg.steps + 1):
            state, metrics = step_fn(state, batch)
            if step < cfg.steps:
                batch = next_batch()
            if step == 1 or step % cfg.log_every == 0 or step == cfg.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                step_time = (now - last_time) / (step - last_step)
                tokens_per_s = cfg.batch_size * cfg.seq_len / step_time
                metrics.update(
                    step=step,
                    step_time_s=step_time,
                    tokens_per_s=tokens_per_s,
                    mfu=tokens_per_s * flops_per_token / (peak * mesh.size),
                )
                if not np.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss is {metrics['loss']} at step {step}")
                log(format_line(metrics, cfg.steps))
                writer.write(metrics)
                history.append(metrics)
                last_time, last_step = time.perf_counter(), step
    writer.close()
    return history
