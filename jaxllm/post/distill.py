"""The distillation phase: a student learns from a frozen teacher's logits on the batches
pretraining reads (`make_source`), with pretraining's step and loop (`train/loop.py`).

The teacher is another run's workdir: its model may differ in width and depth, not in
vocabulary. Its params are placed on the student's mesh by the same sharding rules and
enter the jitted step as arguments; its logits are computed there without gradient.
"""

import functools
from collections.abc import Callable

from jax.sharding import Mesh

from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.nn import Transformer
from jaxllm.post.distill_loss import distill_sums
from jaxllm.train.loop import lm_step
from jaxllm.train.optimizer import make_optimizer
from jaxllm.train.run import read_config, restore_weights
from jaxllm.train.scaffold import Run, Step, run_phase
from jaxllm.train.state import abstract_state, count_params
from jaxllm.train.step import aux_loss, forward


def teacher_config(config: config_lib.Config) -> config_lib.Config:
    """The config the teacher run saved. Raises ConfigError, naming both sizes, unless its
    vocabulary is the student's."""
    workdir = config.distill.teacher
    try:
        teacher = read_config(workdir)
    except FileNotFoundError as error:
        raise config_lib.ConfigError(f"distill.teacher: {error}") from None
    student_vocab, teacher_vocab = config.model.vocab_size, teacher.model.vocab_size
    if teacher_vocab != student_vocab:
        raise config_lib.ConfigError(
            f"distill.teacher: the teacher in {workdir} has vocab_size={teacher_vocab} but the "
            f"student has model.vocab_size={student_vocab}; distillation compares their "
            "distributions token by token, so both need one vocabulary")
    return teacher


def load_teacher(workdir: str, config: config_lib.Config, mesh: Mesh) -> tuple[dict, dict]:
    """(params, moe_bias) of the latest checkpoint of the teacher run in `workdir`, which
    saved `config`, laid out on `mesh` by the sharding rules, as the student's are."""
    target = abstract_state(Transformer(config.model), make_optimizer(config.train), 8, mesh)
    state = restore_weights(workdir, target, config)
    return state.params, state.moe_bias


def distill_loss(params, moe_bias, batch, teacher_params, teacher_moe_bias, *,
                 model: Transformer, teacher: Transformer, cfg: config_lib.DistillConfig,
                 z_loss: float, fp8_meta=None):
    """The train step's loss (`train.step.train_step`) of one micro-batch: the summed
    distillation loss, plus the student's z-loss and aux losses as in pretraining; it
    reports the summed "loss", "kl" and "ce"."""
    logits, moe_metrics, indexer = forward(params, moe_bias, batch, model, fp8_meta)
    aux = aux_loss(model, moe_metrics, indexer)
    teacher_logits = teacher.apply({"params": teacher_params, "moe_bias": teacher_moe_bias},
                                   batch["inputs"], batch["positions"], batch["segment_ids"])
    sums = distill_sums(logits, teacher_logits, batch["targets"], batch["loss_mask"],
                        kind=cfg.kind, alpha=cfg.alpha, temperature=cfg.temperature,
                        z_loss=z_loss)
    tokens = sums["tokens"]
    reported = {name: sums[name] for name in ("loss", "kl", "ce")}
    return sums["loss"] + sums["z_loss"] + aux * tokens, (reported, tokens, moe_metrics, indexer)


def distill(config: config_lib.Config, log: Callable[[str], None] = print,
            stop_after: int | None = None) -> list[dict]:
    """Trains `config.model` on `config.distill`'s loss up to step `config.train.steps`;
    returns this run's logged metrics. Resume, `init_from`, checkpoints, evaluation and
    preemption work as in pretraining.

    The teacher's vocabulary is checked before anything compiles; the teacher is loaded onto
    the run's mesh before the student's state is built.
    """
    config = config_lib.validate(config)
    cfg = config.distill
    if cfg is None:
        raise config_lib.ConfigError(
            "distill: the experiment sets no DistillConfig; set distill.teacher=WORKDIR")
    teacher = teacher_config(config)
    frozen = load_teacher(cfg.teacher, teacher, parallel.make_mesh(config))
    log(f"teacher: {count_params(frozen[0]):,} parameters from {cfg.teacher}")
    build = functools.partial(_distill_step, teacher=Transformer(teacher.model), frozen=frozen)
    return run_phase(config, build=build, seq_len=config.train.seq_len, log=log,
                     stop_after=stop_after)


def _distill_step(run: Run, *, teacher: Transformer, frozen: tuple[dict, dict]) -> Step:
    """Pretraining's step on the distillation loss, the teacher's arrays passed in."""
    loss = functools.partial(distill_loss, model=run.model, teacher=teacher,
                             cfg=run.config.distill, z_loss=run.config.train.z_loss)
    return lm_step(run, loss=loss, frozen=frozen)
