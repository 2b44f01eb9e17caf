"""Observability of a run: JSONL and TensorBoard metrics, evaluation against a direct
computation, the profiler trace, the progress display, the plots, and batch assembly."""

import itertools
import math
import struct
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec
from tensorboardX.proto import event_pb2

from jaxllm import Config, MeshConfig, parallel
from jaxllm.cli import main
from jaxllm.data import make_source
from jaxllm.nn import Transformer
from jaxllm.train.loop import global_batch, pretrain
from jaxllm.train.metrics import MetricsWriter, read_jsonl
from jaxllm.train.progress import Progress
from runs import STEPS, compilation_cache, logged_steps, quiet, run_config

TRAIN_KEYS = {"loss", "grad_norm", "learning_rate", "tokens_per_s", "mfu", "step_time_s"}
EVAL_KEYS = {"eval_loss", "eval_perplexity"}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Shares compiled executables with the runs of the checkpoint tests."""
    with compilation_cache(tmp_path_factory.getbasetemp() / "xla_cache"):
        yield


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """A run that logs every 2 steps, evaluates every 3 and traces steps 2-3; its config."""
    config = run_config(tmp_path_factory.mktemp("observed"), log_every=2, eval_every=3,
                        eval_batches=2, profile_start=2, profile_steps=2)
    pretrain(config, log=quiet)
    return config


def tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from the event files: TFRecord framing around Event protos."""
    scalars = {}
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        while data:
            (length,) = struct.unpack("<Q", data[:8])
            event = event_pb2.Event.FromString(data[12:12 + length])
            data = data[16 + length:]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_jsonl_and_tensorboard_hold_train_and_eval_metrics(observed):
    workdir = Path(observed.workdir)
    records = read_jsonl(workdir / "metrics.jsonl")
    train = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(train) == [1, 2, 4, 6, STEPS]
    assert sorted(evals) == [3, 6]
    assert all(TRAIN_KEYS <= r.keys() for r in train.values())
    for r in evals.values():
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12)
    scalars = tensorboard_scalars(workdir / "tb")
    assert TRAIN_KEYS | EVAL_KEYS <= scalars.keys()
    assert scalars["loss"] == pytest.approx({s: r["loss"] for s, r in train.items()}, rel=1e-6)
    assert scalars["eval_loss"] == pytest.approx(
        {s: r["eval_loss"] for s, r in evals.items()}, rel=1e-6
    )


def test_eval_loss_equals_a_direct_computation(observed):
    """The logged eval loss of step 6, against optax's cross-entropy over the same
    validation batches with the params of the checkpoint of step 6."""
    cfg = observed.train
    model = Transformer(observed.model)
    saved = Path(observed.workdir) / "checkpoints" / "6" / "state"
    params = jax.device_get(ocp.StandardCheckpointer().restore(saved)["params"])
    validation = make_source(observed, split="validation").batches(cfg.batch_size, cfg.seq_len)
    apply = jax.jit(model.apply)
    nll = tokens = 0.0
    for batch in itertools.islice(validation, cfg.eval_batches):
        logits = apply({"params": params}, batch["inputs"], batch["positions"],
                       batch["segment_ids"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        nll += float((losses * batch["loss_mask"]).sum())
        tokens += float(batch["loss_mask"].sum())
    logged = [r for r in read_jsonl(Path(observed.workdir) / "metrics.jsonl") if "eval_loss" in r]
    assert logged[-1]["step"] == 6
    np.testing.assert_allclose(logged[-1]["eval_loss"], nll / tokens, rtol=1e-5)


def test_profiler_writes_a_trace(observed):
    assert list((Path(observed.workdir) / "profile").rglob("*.xplane.pb"))


def test_plot_command_writes_pngs(observed, tmp_path, capsys):
    workdir = Path(observed.workdir)
    assert main(["plot", str(workdir)]) == 0
    names = {"loss.png", "learning_rate.png", "throughput.png"}
    assert {p.name for p in (workdir / "plots").iterdir()} == names
    for name in names:
        assert (workdir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.jsonl'} does not exist" in capsys.readouterr().err


def test_metrics_writer_drops_records_past_the_resumed_step(tmp_path):
    writer = MetricsWriter(str(tmp_path), start_step=0)
    for step in range(1, 6):
        writer.write({"step": step, "loss": float(step)})
    writer.close()
    writer = MetricsWriter(str(tmp_path), start_step=3)
    writer.write({"step": 4, "loss": 40.0})
    writer.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
        {"step": 4, "loss": 40.0},
    ]
    assert logged_steps(tmp_path) == [1, 2, 3, 4]


def record(step: int) -> dict:
    return {"step": step, "loss": 1.5, "grad_norm": 0.5, "learning_rate": 1e-3,
            "tokens_per_s": 100.0, "step_time_s": 2.0, "mfu": 0.1}


def test_progress_without_a_terminal_prints_lines_with_the_eta():
    lines = []
    progress = Progress(total=100, start=10, log=lines.append, interactive=False)
    progress.report(record(40))
    progress.close()
    assert lines[0].startswith("step     40/100 | loss 1.5000")
    assert lines[0].endswith("| ETA 0:02:00")  # 60 steps left at 2 s


def test_progress_on_a_terminal_shows_a_bar_and_prints_lines_above_it(capsys):
    lines = []
    progress = Progress(total=100, start=10, log=lines.append, interactive=True)
    progress.advance(40)
    progress.report(record(40))
    progress.close()
    assert len(lines) == 1 and lines[0].startswith("step     40/100 | loss 1.5000")
    assert "ETA" not in lines[0]  # the bar shows it
    bar = capsys.readouterr().err
    assert "40/100" in bar and "loss=1.5000" in bar


def test_global_batch_assembles_the_sharded_batch():
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=2, fsdp=4)))
    local = {"inputs": np.arange(8 * 32, dtype=np.int32).reshape(8, 32),
             "patches": np.arange(8 * 4 * 3, dtype=np.float32).reshape(8, 4, 3)}
    batch = global_batch(local, mesh, batch_size=8)
    assert batch["inputs"].sharding == parallel.batch_sharding(mesh)
    assert batch["patches"].sharding.spec == PartitionSpec(parallel.BATCH_AXES)
    for key in local:
        np.testing.assert_array_equal(batch[key], local[key])


def test_read_jsonl_leaves_out_a_last_line_cut_short(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1}, {"step": 2}]
