"""Distillation: the KL losses against NumPy, the teacher's vocabulary and layout, and a
distilled student against one trained on the data alone."""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import arithmetic_batch, tiny_model
from jaxllm import Config, ConfigError, DataConfig, MeshConfig, TrainConfig, parallel
from jaxllm import config as config_lib
from jaxllm.cli import main
from jaxllm.config import CheckpointConfig, DistillConfig
from jaxllm.nn import Transformer
from jaxllm.post.distill import distill, distill_loss, load_teacher
from jaxllm.post.distill_loss import distill_sums, forward_kl, reverse_kl
from jaxllm.train.loop import pretrain
from jaxllm.train.metrics import read_jsonl
from jaxllm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxllm.train.run import load_run, read_config
from jaxllm.train.state import init_state
from jaxllm.train.step import jit_train_step
from runs import quiet

STUDENT = tiny_model(embed_dim=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=128)
SHARDED = MeshConfig(data=2, fsdp=2, tensor=2)
EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "tiny_distill.py"


def np_log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(p_logits, q_logits, temperature):
    """T^2 * KL(p || q) per token, both softened by T, in float64."""
    log_p = np_log_softmax(p_logits / temperature)
    log_q = np_log_softmax(q_logits / temperature)
    return temperature**2 * (np.exp(log_p) * (log_p - log_q)).sum(-1)


def tiny_logits():
    rng = np.random.default_rng(0)
    student, teacher = ((rng.normal(size=(2, 5, 11)) * 3).astype(np.float32) for _ in range(2))
    targets = rng.integers(0, 11, size=(2, 5)).astype(np.int32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], np.float32)
    return student, teacher, targets, mask


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_and_reverse_kl_match_numpy(temperature):
    student, teacher, _, _ = tiny_logits()
    np.testing.assert_allclose(forward_kl(student, teacher, temperature),
                               np_kl(teacher, student, temperature), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reverse_kl(student, teacher, temperature),
                               np_kl(student, teacher, temperature), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_alpha_mixes_kl_and_ce_over_the_masked_tokens_only(kind):
    student, teacher, targets, mask = tiny_logits()
    options = dict(kind=kind, alpha=0.3, temperature=2.0)
    sums = distill_sums(student, teacher, targets, mask, **options)
    pair = (teacher, student) if kind == "forward" else (student, teacher)
    want_kl = (np_kl(*pair, 2.0) * mask).sum()
    nll = -np.take_along_axis(np_log_softmax(student), targets[..., None], -1)[..., 0]
    want_ce = (nll * mask).sum()
    np.testing.assert_allclose(sums["kl"], want_kl, rtol=1e-5)
    np.testing.assert_allclose(sums["ce"], want_ce, rtol=1e-5)
    np.testing.assert_allclose(sums["loss"], 0.3 * want_kl + 0.7 * want_ce, rtol=1e-5)
    assert sums["tokens"] == mask.sum()
    # Whatever the masked-out tokens hold, the sums are the same.
    noise = np.random.default_rng(1).normal(size=student.shape) * 10 * (1 - mask[..., None])
    other_targets = np.where(mask == 1, targets, (targets + 3) % 11)
    changed = distill_sums(student + noise, teacher - noise, other_targets, mask, **options)
    for name in ("loss", "kl", "ce"):
        np.testing.assert_allclose(changed[name], sums[name], rtol=1e-6)


def test_the_teacher_logits_get_no_gradient():
    student, teacher, targets, mask = tiny_logits()
    loss = lambda t: distill_sums(student, t, targets, mask, kind="forward", alpha=0.5,
                                  temperature=2.0)["loss"]
    assert not np.any(jax.grad(loss)(jnp.asarray(teacher)))


def distill_step_metrics(grad_accum: int) -> dict:
    """The metrics of one distillation step of STUDENT from a randomly initialised teacher
    that is wider and deeper, on the 2x2x2 mesh."""
    train = TrainConfig(batch_size=16, seq_len=32, grad_accum=grad_accum, z_loss=1e-3)
    mesh = parallel.make_mesh(Config(model=STUDENT, mesh=SHARDED, train=train))
    model, teacher = Transformer(STUDENT), Transformer(tiny_model(num_layers=3))
    tx = make_optimizer(train)
    state, shardings = init_state(model, tx, train.seq_len, mesh, jax.random.key(0))
    teacher_state, _ = init_state(teacher, tx, train.seq_len, mesh, jax.random.key(1))
    frozen = (teacher_state.params, teacher_state.moe_bias)
    loss = functools.partial(
        distill_loss, model=model, teacher=teacher, z_loss=train.z_loss,
        cfg=DistillConfig(teacher="unused", kind="reverse", alpha=0.5, temperature=2.0))
    batch = jax.device_put(arithmetic_batch(16, 32), parallel.batch_sharding(mesh))
    with parallel.use_mesh(mesh):
        step = jit_train_step(model, tx, train, learning_rate_schedule(train), mesh, shardings,
                              loss=loss, frozen_shardings=jax.tree.map(lambda x: x.sharding,
                                                                       frozen))
        _, metrics = step(state, batch, *frozen)
    return jax.device_get(metrics)


def test_distillation_accumulates_micro_batches_exactly():
    want, got = distill_step_metrics(1), distill_step_metrics(4)
    for name in ("loss", "kl", "ce", "grad_norm"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(want["loss"], 0.5 * want["kl"] + 0.5 * want["ce"], rtol=1e-6)


def run_config(model, workdir, *, steps: int, mesh=SHARDED, learning_rate=1e-2,
               distill_cfg=None) -> Config:
    """A run on arithmetic that logs and evaluates only at its last step."""
    return Config(
        model=model, mesh=mesh, data=DataConfig(source="arithmetic"),
        train=TrainConfig(steps=steps, batch_size=8, seq_len=32, learning_rate=learning_rate,
                          warmup_steps=5, log_every=steps, eval_every=steps, eval_batches=4,
                          peak_flops=1e9),
        checkpoint=CheckpointConfig(every=1000), distill=distill_cfg, workdir=str(workdir))


def eval_loss(workdir) -> float:
    (record,) = [r for r in read_jsonl(workdir / "metrics.jsonl") if "eval_loss" in r]
    return record["eval_loss"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The workdir of the tiny model trained on arithmetic, on the 8-way data mesh. It logs
    only at its last step, so it also proves that the loop does not queue all its steps on
    XLA:CPU's devices (dozens in flight deadlock its collectives)."""
    workdir = tmp_path_factory.mktemp("teacher")
    pretrain(run_config(tiny_model(), workdir, steps=100, mesh=MeshConfig(data=8),
                        learning_rate=3e-3), log=quiet)
    return workdir


def test_a_narrower_shallower_student_learns_more_from_the_teacher_than_alone(
        teacher, tmp_path):
    """The student (width 32, 1 layer) of a teacher of width 64 and 2 layers, both on a
    2x2x2 mesh the teacher did not train on, with the same seed, data and steps."""
    pretrain(run_config(STUDENT, tmp_path / "alone", steps=40), log=quiet)
    history = distill(run_config(STUDENT, tmp_path / "distilled", steps=40,
                                 distill_cfg=DistillConfig(teacher=str(teacher))), log=quiet)
    assert {"loss", "kl", "ce"} <= history[-1].keys()
    assert history[-1]["loss"] == history[-1]["kl"]  # alpha = 1
    alone, distilled = eval_loss(tmp_path / "alone"), eval_loss(tmp_path / "distilled")
    assert distilled < alone - 0.02, (distilled, alone)


def test_the_teacher_lies_on_the_students_mesh_with_its_own_values(teacher):
    config = read_config(teacher)
    mesh = parallel.make_mesh(dataclasses.replace(config, mesh=SHARDED))
    params, _ = load_teacher(str(teacher), config, mesh)
    _, _, state = load_run(teacher)  # on one device
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 jax.device_get(state.params))
    query = params["decoder"]["layers"]["attn"]["query"]["kernel"]
    assert query.sharding.mesh == mesh and not query.sharding.is_fully_replicated


def test_a_teacher_with_another_vocabulary_is_refused_before_compiling(teacher, tmp_path,
                                                                       capsys):
    student = dataclasses.replace(STUDENT, vocab_size=512)
    config = run_config(student, tmp_path / "student", steps=2,
                        distill_cfg=DistillConfig(teacher=str(teacher)))
    with pytest.raises(ConfigError, match="distill.teacher: .* vocab_size=384 .* "
                                          "model.vocab_size=512"):
        distill(config, log=quiet)
    assert not (tmp_path / "student").exists()
    argv = ["distill", str(EXPERIMENT), f"distill.teacher={teacher}",
            "model.vocab_size=512", f"workdir={tmp_path / 'cli'}"]
    assert main(argv) == 2
    assert "jaxllm: config error: distill.teacher: " in capsys.readouterr().err


def test_distill_config_names_its_bad_fields():
    with pytest.raises(ConfigError, match="distill.teacher: name the teacher"):
        config_lib.validate(Config(distill=DistillConfig()))
    for field, value in (("alpha", 1.5), ("temperature", 0.0)):
        with pytest.raises(ConfigError, match=f"distill.{field}: "):
            DistillConfig(teacher="t", **{field: value}).validate("distill.")
