"""Configs: overrides with coerced types, and bad configs that fail early, naming the field."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm import Config, ConfigError, MeshConfig, ModelConfig, parallel
from jaxllm import config as config_lib
from jaxllm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_coerce_types_from_the_dataclass():
    config = config_lib.apply_overrides(
        Config(),
        [
            "train.steps=50",
            "train.learning_rate=1e-4",
            "model.dtype=bfloat16",
            "model.tie_embeddings=true",
            "model.head_dim=16",
            "train.peak_flops=none",
            "workdir=runs/a",
        ],
    )
    assert config.train.steps == 50 and isinstance(config.train.steps, int)
    assert config.train.learning_rate == 1e-4
    assert config.model.dtype == "bfloat16"
    assert config.model.tie_embeddings is True
    assert config.model.head_dim == 16
    assert config.train.peak_flops is None
    assert config.workdir == "runs/a"


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.stpes=5", "train.stpes"),
        ("nonsense=1", "nonsense"),
        ("train.steps=fifty", "train.steps"),
        ("model.dtype=float16", "model.dtype"),
        ("model.scan_layers=maybe", "model.scan_layers"),
        ("model.num_heads=3", "model.num_heads"),  # does not divide embed_dim=128
        ("model.num_kv_heads=3", "model.num_kv_heads"),  # does not divide num_heads=4
        ("train.grad_accum=3", "train.grad_accum"),  # does not divide batch_size=16
        ("train", "train"),
        ("train=3", "train"),
    ],
)
def test_bad_overrides_raise_an_error_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"^'?{field}"):
        config_lib.apply_overrides(Config(), [override])


@pytest.mark.parametrize(
    "mesh",
    [MeshConfig(data=3), MeshConfig(data=2, fsdp=2), MeshConfig(data=-1, tensor=3)],
    ids=["3", "2x2", "-1x3"],
)
def test_a_mesh_that_does_not_tile_the_devices_is_rejected(mesh):
    with pytest.raises(ConfigError, match="^mesh"):
        parallel.make_mesh(Config(mesh=mesh))


def test_minus_one_fills_the_remaining_devices():
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=-1, tensor=2)))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1, "context": 1}


def test_head_dim_may_be_set_when_heads_do_not_divide_the_width():
    config_lib.validate(Config(model=ModelConfig(embed_dim=96, num_heads=4, num_kv_heads=2, head_dim=32)))


def test_experiment_file_loads_and_round_trips_through_json(tmp_path):
    config = config_lib.load_experiment(ROOT / "experiments" / "tiny_dense.py")
    config_lib.save(config, tmp_path / "config.json")
    assert config_lib.from_dict(json.loads((tmp_path / "config.json").read_text())) == config
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load_experiment(tmp_path / "missing.py")


def test_cli_pretrain_writes_the_resolved_config_and_metrics(tmp_path, capsys):
    experiment = str(ROOT / "experiments" / "tiny_dense.py")
    code = main(["pretrain", experiment, "train.steps=3", "train.warmup_steps=1",
                 "train.seq_len=32", f"workdir={tmp_path}"])
    assert code == 0
    assert "step      3/3" in capsys.readouterr().out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["workdir"] == str(tmp_path)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_cli_reports_config_errors_without_a_traceback(capsys):
    experiment = str(ROOT / "experiments" / "tiny_dense.py")
    assert main(["pretrain", experiment, "model.num_kv_heads=3"]) == 2
    err = capsys.readouterr().err
    assert "model.num_kv_heads" in err and "Traceback" not in err


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "jaxllm", "--help"], capture_output=True, text=True, check=True
    )
    assert "pretrain" in result.stdout and "demo" in result.stdout
