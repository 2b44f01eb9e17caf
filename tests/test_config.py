"""Configs: overrides with coerced types, and bad configs that fail early, naming the field."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm import Config, ConfigError, MeshConfig, ModelConfig, parallel, presets
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
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.b2=1", "train.b2"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio"),
        ("train.eps=0", "train.eps"),
        ("train", "train"),
        ("train=3", "train"),
    ],
)
def test_bad_overrides_raise_an_error_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"^'?{field}"):
        config_lib.apply_overrides(Config(), [override])


# One config per check, failing only that check, and the check's whole message.
MESSAGES = [
    ("model.vocab_size=0", "model.vocab_size: must be positive, got 0"),
    ("model.num_heads=3",
     "model.num_heads: 3 heads do not divide model.embed_dim=128; pick a divisor or set "
     "model.head_dim explicitly"),
    ("model.head_dim=0", "model.head_dim: must be positive, got 0"),
    ("model.num_kv_heads=3", "model.num_kv_heads: 3 kv heads do not divide model.num_heads=4"),
    ("model.head_dim=15", "model.head_dim: RoPE needs an even head dimension"),
    ("model.moe.num_experts=0", "model.moe.num_experts: must be positive, got 0"),
    ("model.moe.experts_per_token=9",
     "model.moe.experts_per_token: 9 exceeds model.moe.num_experts=8"),
    ("model.moe.n_group=3", "model.moe.n_group: 3 groups do not divide model.moe.num_experts=8"),
    ("model.moe.n_group=8",
     "model.moe.n_group: a group is scored by its top-2 experts, so each group needs "
     "at least 2"),
    ("model.moe.topk_group=2", "model.moe.topk_group: 2 exceeds model.moe.n_group=1"),
    ("model.moe.n_group=4 model.moe.experts_per_token=3",
     "model.moe.topk_group: 1 groups hold fewer than experts_per_token=3 experts"),
    ("model.moe.num_shared_experts=-1", "model.moe.num_shared_experts: must be >= 0"),
    ("model.moe.shared_expert_dim=0", "model.moe.shared_expert_dim: must be positive or None"),
    ("model.moe.first_dense_layers=3",
     "model.moe.first_dense_layers: must lie in [0, model.num_layers=2]"),
    ("model.moe.first_dense_layers=1 model.moe.moe_every=2",
     "model.moe.moe_every: must divide the 1 layers after the dense ones, so that the layer "
     "groups repeat exactly"),
    ("model.moe.load_balance_loss=-1", "model.moe.load_balance_loss: must be >= 0"),
    ("model.moe.bias_update_rate=0.1",
     "model.moe.bias_update_rate: the selection bias belongs to the sigmoid router; set "
     "model.moe.router=sigmoid"),
    ("model.attention.pattern=global,banana",
     "model.attention.pattern: 'banana' in 'global,banana' is not one of ['global', 'sliding', "
     "'chunked', 'strided', 'sparse', 'ssm']"),
    ("model.attention.positions=rope,xx",
     "model.attention.positions: 'xx' in 'rope,xx' is not one of ['rope', 'alibi', 'none']"),
    ("model.attention.window=0", "model.attention.window: must be positive, got 0"),
    ("model.attention.rope_factor=0.5",
     "model.attention.rope_factor: extends the context, so must be >= 1, got 0.5"),
    ("model.attention.rope_high_freq_factor=1",
     "model.attention.rope_high_freq_factor: must exceed rope_low_freq_factor=1.0"),
    ("model.attention.pattern=sparse",
     "model.attention.sparse: the pattern has sparse layers; set the indexer, e.g. "
     "model.attention.sparse.top_k=64"),
    ("model.attention.sparse.top_k=0", "model.attention.sparse.top_k: must be positive, got 0"),
    ("model.attention.sparse.loss_weight=-1", "model.attention.sparse.loss_weight: must be >= 0"),
    ("model.attention.mla.kv_lora_rank=0",
     "model.attention.mla.kv_lora_rank: must be positive, got 0"),
    ("model.attention.mla.q_lora_rank=0",
     "model.attention.mla.q_lora_rank: must be positive or None"),
    ("model.attention.mla.qk_rope_head_dim=15",
     "model.attention.mla.qk_rope_head_dim: RoPE needs an even dimension"),
    ("model.attention.mla.absorb=true model.num_kv_heads=2",
     "model.num_kv_heads: MLA gives every head its own key and value; set "
     "num_kv_heads=num_heads"),
    ("model.attention.mla.absorb=true model.attention.qk_norm=rms",
     "model.attention.qk_norm: MLA normalises its latents instead; set qk_norm=none"),
    ("model.attention.mla.absorb=true model.attention.qkv_bias=true",
     "model.attention.qkv_bias: MLA projections have no biases; set qkv_bias=false"),
    ("model.attention.kernel=splash model.attention.positions=alibi",
     "model.attention.kernel: splash does not run alibi positions (layer 0); use kernel=auto "
     "or blockwise"),
    ("model.attention.kernel=splash model.attention.pattern=global,strided",
     "model.attention.kernel: splash does not run strided layers (layer 1); use kernel=auto or "
     "blockwise"),
    ("model.vision.image_size=30",
     "model.vision.image_size: must be 0 (text only) or a positive multiple of "
     "model.vision.patch_size=4, got 30"),
    ("model.vision.image_size=-4",
     "model.vision.image_size: must be 0 (text only) or a positive multiple of "
     "model.vision.patch_size=4, got -4"),
    ("model.vision.channels=0", "model.vision.channels: must be positive, got 0"),
    ("model.vision.image_size=32 model.vision.patch_token_id=512",
     "model.vision.patch_token_id: must lie in [0, model.vocab_size=512), got 512"),
    ("mesh.fsdp=-1",
     "mesh: at most one axis may be -1, got {'data': -1, 'fsdp': -1, 'tensor': 1, 'expert': 1, "
     "'context': 1}"),
    ("mesh.tensor=0", "mesh.tensor: must be -1 or >= 1, got 0"),
    ("mesh.slices=0", "mesh.slices: must be >= 1, got 0"),
    ("train.steps=0", "train.steps: must be positive, got 0"),
    ("train.grad_accum=3", "train.grad_accum: 3 micro-batches do not divide train.batch_size=16"),
    ("model.attention.kernel=blockwise train.seq_len=192",
     "train.seq_len: 192 must be a multiple of model.attention.block_size=128 for the "
     "blockwise kernel"),
    ("train.warmup_steps=-1", "train.warmup_steps: must be >= 0, got -1"),
    ("train.learning_rate=0", "train.learning_rate: must be positive"),
    ("train.eval_every=-1", "train.eval_every: must be >= 0, got -1"),
    ("train.eval_batches=0", "train.eval_batches: must be positive, got 0"),
    ("train.profile_steps=2",
     "train.profile_start: steps count from 1; set the first step to trace"),
    ("train.profile_steps=2 train.profile_start=1",
     "train.profile_steps: the trace goes to workdir/profile; set workdir"),
    ("checkpoint.every=0", "checkpoint.every: must be positive, got 0"),
    ("checkpoint.resume_step=0",
     "checkpoint.resume_step: must be a saved step >= 1 or none, got 0"),
    ("grpo.group_size=1", "grpo.group_size: a group needs >= 2 completions to compare, got 1"),
    ("grpo.temperature=0", "grpo.temperature: must be positive, got 0.0"),
    ("grpo.epsilon_low=1", "grpo.epsilon_low: must lie in [0, 1), got 1.0"),
    ("grpo.eval_problems=0", "grpo.eval_problems: must be >= 1, got 0"),
    ("grpo.beta=-1", "grpo.beta: must be >= 0, got -1.0"),
    ("grpo.overlong_buffer=65",
     "grpo.overlong_buffer: must lie in [0, grpo.max_completion_len=64]"),
    ("grpo.group_size=3",
     "train.batch_size: an RL batch is whole groups: 16 sequences do not split into groups of "
     "grpo.group_size=3"),
    ("data.source=tfds", "data.name: source=tfds needs a dataset name"),
    ("data.source=text", "data.paths: source=text needs file paths"),
    ("data.difficulty=0", "data.difficulty: must be positive, got 0"),
]


@pytest.mark.parametrize("overrides, message", MESSAGES)
def test_each_check_names_the_field_and_says_how_to_fix_it(overrides, message):
    with pytest.raises(ConfigError) as error:
        config_lib.apply_overrides(Config(), overrides.split())
    assert str(error.value) == message


# The same against 8 devices, for the checks of the mesh and batch against the devices.
DEVICE_MESSAGES = [
    ("mesh.tensor=3",
     "mesh: the fixed axes {'data': -1, 'fsdp': 1, 'tensor': 3, 'expert': 1, 'context': 1} "
     "(product 3) do not divide the 8 devices"),
    ("mesh.data=3",
     "mesh: the axis sizes {'data': 3, 'fsdp': 1, 'tensor': 1, 'expert': 1, 'context': 1} "
     "multiply to 3, but there are 8 devices; make the product match or set one axis to -1"),
    ("model.moe.num_experts=6 mesh.expert=4",
     "model.moe.num_experts: expert parallelism needs mesh.expert=4 to divide the experts; "
     "change either, or set model.moe.expert_parallel=false"),
    ("mesh.slices=3", "mesh.slices: the data axis (8) must split evenly over 3 slices"),
    ("train.batch_size=4",
     "train.batch_size: each of the 1 micro-batches of 4 sequences must split evenly over "
     "mesh.data*mesh.fsdp=8 shards"),
    ("mesh.context=4 train.seq_len=36",
     "train.seq_len: 36 must be a multiple of 8: ring attention cuts each sequence into 2 "
     "chunks on each of the mesh.context=4 devices"),
]


@pytest.mark.parametrize("overrides, message", DEVICE_MESSAGES)
def test_each_device_check_names_the_field_and_says_how_to_fix_it(overrides, message):
    config = config_lib.apply_overrides(Config(), overrides.split())
    with pytest.raises(ConfigError) as error:
        parallel.validate_for_devices(config, 8)
    assert str(error.value) == message


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


def test_cli_pretrain_takes_a_preset_name(tmp_path, capsys):
    code = main(["pretrain", "tiny_dense", "train.steps=2", "train.warmup_steps=1",
                 "train.batch_size=8", "train.seq_len=32", "train.eval_every=0",
                 f"workdir={tmp_path}"])
    assert code == 0
    assert "step      2/2" in capsys.readouterr().out
    saved = config_lib.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert saved.model == presets.tiny_dense() and saved.train.steps == 2
    assert presets.run_config("tiny_dense").workdir == "runs/tiny_dense"
    assert main(["pretrain", "tiny_nothing", "train.steps=2"]) == 2
    err = capsys.readouterr().err
    assert "'tiny_nothing' is neither an experiment file (.py) nor a preset" in err


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


def test_the_demo_refuses_a_model_override_for_one_run_before_training(tmp_path, capsys):
    """GRPO starts from the pretrained checkpoint, so the two models must be the same."""
    assert main(["demo", "--workdir", str(tmp_path), "pretrain.model.num_layers=2"]) == 2
    assert ("pretrain.model and rl.model differ in num_layers: GRPO starts from the "
            "pretrained model" in capsys.readouterr().err)
    assert not list(tmp_path.iterdir())
    assert main(["demo", "--workdir", str(tmp_path), "train.steps=2"]) == 2
    assert "demo overrides start with pretrain. or rl." in capsys.readouterr().err
