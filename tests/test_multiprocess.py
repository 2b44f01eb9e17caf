"""Two real JAX processes (4 CPU devices each, gloo collectives) train like one 8-device
process, and stop together at one step, with a checkpoint, when one of them is told to stop
(SIGTERM): both the pretraining and the GRPO phase."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from jaxllm import config as config_lib
from jaxllm.train.loop import pretrain

PRETRAIN = textwrap.dedent('''
    from jaxllm import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig

    def config():
        return Config(
            model=ModelConfig(vocab_size=384, embed_dim=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, mlp_dim=128),
            mesh=MeshConfig(data=2, fsdp=4),
            data=DataConfig(source="arithmetic"),
            train=TrainConfig(steps=10_000, batch_size=8, seq_len=32, warmup_steps=1, log_every=1,
                              eval_every=0),
        )
''')

GRPO = textwrap.dedent('''
    from jaxllm import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig
    from jaxllm.config import GRPOConfig

    def config():
        return Config(
            model=ModelConfig(vocab_size=288, embed_dim=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, mlp_dim=64),
            mesh=MeshConfig(data=2, fsdp=4),
            data=DataConfig(train_size=200, validation_size=20, test_size=20),
            train=TrainConfig(steps=10_000, batch_size=8, warmup_steps=0, log_every=1),
            grpo=GRPOConfig(group_size=4, max_completion_len=8, eval_every=0),
        )
''')

# Both runs are far longer than the tests: they end by the preemption notice.
EXPERIMENTS = {"pretrain": PRETRAIN, "grpo": GRPO}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: str, experiment, workdir, outputs: list) -> list[subprocess.Popen]:
    """`jaxllm COMMAND` as two processes of one run; their output goes to `outputs`' files.
    They share a new TFDS data_dir, so a run on the reasoning corpus builds it there."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
           "--xla_backend_optimization_level=0",
           "JAX_PLATFORMS": "cpu", "TFDS_DATA_DIR": str(workdir.parent / "tfds")}
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "jaxllm", command, str(experiment), f"workdir={workdir}",
             "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
            env=env, stdout=open(output, "w"), stderr=subprocess.STDOUT,
        )
        for i, output in enumerate(outputs)
    ]


def logged_steps(workdir) -> list[int]:
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]




def stop_one_of_two(command: str, tmp_path) -> tuple[int, object]:
    """Runs `jaxllm COMMAND` as two processes, SIGTERMs the second after step 2 and checks
    that both stop at one step and save it; returns (that step, the workdir)."""
    experiment = tmp_path / "exp.py"
    experiment.write_text(EXPERIMENTS[command])
    workdir = tmp_path / "run"
    outputs = [tmp_path / f"process{i}.txt" for i in range(2)]
    procs = launch(command, experiment, workdir, outputs)
    deadline = time.monotonic() + 240
    while max(logged_steps(workdir), default=0) < 2:
        assert all(p.poll() is None for p in procs), [o.read_text() for o in outputs]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    for p, output in zip(procs, outputs):
        assert p.wait(timeout=120) == 0, output.read_text()
    stops = [line for output in outputs for line in output.read_text().splitlines()
             if line.startswith("stopped at")]
    assert len(stops) == 2 and stops[0] == stops[1], stops
    assert stops[0].endswith("on a preemption notice (SIGTERM)")
    step = int(stops[0].split(" on ")[0].split()[-1])
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == [str(step)]
    assert logged_steps(workdir)[-1] == step
    return step, workdir


@pytest.mark.slow
def test_two_pretraining_processes_match_one_and_stop_together(tmp_path):
    step, workdir = stop_one_of_two("pretrain", tmp_path)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    two = [r["loss"] for r in records if "loss" in r]

    config = config_lib.load_experiment(str(tmp_path / "exp.py"))
    config = config_lib.apply_overrides(config, [f"workdir={tmp_path / 'one'}"])
    one = [m["loss"] for m in pretrain(config, log=lambda _: None, stop_after=step)]
    assert two == pytest.approx(one, rel=1e-5)


@pytest.mark.slow
def test_two_grpo_processes_stop_together(tmp_path):
    stop_one_of_two("grpo", tmp_path)  # both processes read the corpus: process 0 builds it


@pytest.mark.parametrize("tpu_vm", [True, False])
def test_every_tpu_vm_initialises_and_a_lone_cpu_process_does_not(monkeypatch, tpu_vm):
    """A gcloud TPU VM's environment names no workers, so each one initialises and JAX reads
    the hosts from the VM's metadata; a single process elsewhere is left alone."""
    from jaxllm import distributed

    calls = []
    monkeypatch.setattr(distributed, "has_tpu", lambda: tpu_vm)
    monkeypatch.setattr(distributed.jax.distributed, "initialize",
                        lambda *args: calls.append(args))
    distributed.initialize()
    assert calls == ([()] if tpu_vm else [])
