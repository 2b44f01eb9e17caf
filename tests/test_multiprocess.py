"""Two real JAX processes (4 CPU devices each, gloo collectives) train like one 8-device process."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from jaxllm import config as config_lib
from jaxllm.train.loop import pretrain

EXPERIMENT = textwrap.dedent('''
    from jaxllm import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig

    def config():
        return Config(
            model=ModelConfig(vocab_size=384, embed_dim=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, mlp_dim=128),
            mesh=MeshConfig(data=2, fsdp=4),
            data=DataConfig(source="arithmetic"),
            train=TrainConfig(steps=4, batch_size=8, seq_len=32, warmup_steps=1, log_every=1,
                              eval_every=0),
        )
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    experiment = tmp_path / "exp.py"
    experiment.write_text(EXPERIMENT)
    workdir = tmp_path / "two"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxllm", "pretrain", str(experiment), f"workdir={workdir}",
             "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    two = [r["loss"] for r in records if "loss" in r]
    assert (workdir / "checkpoints" / "4").is_dir(), "the final checkpoint is missing"

    config = config_lib.load_experiment(str(experiment))
    config = config_lib.apply_overrides(config, [f"workdir={tmp_path / 'one'}"])
    one = [m["loss"] for m in pretrain(config, log=lambda _: None)]
    assert two == pytest.approx(one, rel=1e-5)
