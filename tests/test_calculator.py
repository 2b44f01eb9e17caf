"""The calculator against published counts, explicit formulas and a real sharded state."""

import dataclasses
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxllm import Config, MeshConfig, TrainConfig, calculator, cli, presets
from jaxllm.config import VisionConfig, load_experiment
from jaxllm.nn.transformer import Transformer
from jaxllm.parallel import make_mesh, validate_for_devices
from jaxllm.train import flops
from jaxllm.train.optimizer import make_optimizer
from jaxllm.train.state import init_state

EXPERIMENTS = Path(__file__).parent.parent / "experiments"


@pytest.mark.parametrize("preset, count", [
    (presets.llama3_8b, 8_030_261_248),
    (presets.llama3_1b, 1_235_814_400),  # Llama-3.2-1B's count: its scaling has no weights
])
def test_llama3_counts_exactly(preset, count):
    total, active = calculator.param_counts(preset())
    assert sum(total.values()) == sum(active.values()) == count


@pytest.mark.parametrize("preset, total, active", [
    (presets.mixtral_8x7b, 46.7e9, 12.9e9),
    (presets.mixtral_8x22b, 141e9, 39e9),
])
def test_mixtral_matches_published_totals(preset, total, active):
    before = len(jax.live_arrays())
    counts, used = calculator.param_counts(preset())  # 562 GB in float32 for 8x22B
    assert len(jax.live_arrays()) == before
    assert sum(counts.values()) == pytest.approx(total, rel=0.01)
    assert sum(used.values()) == pytest.approx(active, rel=0.01)


@pytest.mark.parametrize("preset, total, active, embedding_active", [
    (presets.deepseek_v3, 671e9, 36.6e9, False),  # DeepSeek counts leave out the embedding
    (presets.kimi_k2, 1026.4e9, 31.7e9, False),
    (presets.llama4_scout, 107.77e9, 17.17e9, True),  # text-only
    (presets.llama4_maverick, 400e9, 17.19e9, True),
    (presets.qwen3_235b_a22b, 235e9, 22.19e9, True),
    (presets.qwen3_30b_a3b, 30.53e9, 3.35e9, True),
])
def test_published_totals_and_active_counts(preset, total, active, embedding_active):
    counts, used = calculator.param_counts(preset())
    assert sum(counts.values()) == pytest.approx(total, rel=0.01)
    active_count = sum(used.values()) - (0 if embedding_active else used["embedding"])
    assert active_count == pytest.approx(active, rel=0.01)


def test_mla_presets_cache_the_latent_and_rope_key_only():
    """576 bf16 values per token per layer for DeepSeek-V3; 2 x 8 x 128 for Llama-3-8B."""
    assert calculator.kv_cache_bytes_per_token(presets.deepseek_v3()) == 61 * 576 * 2
    assert calculator.kv_cache_bytes_per_token(presets.llama3_8b()) == 32 * 2048 * 2


def test_categories_follow_the_worked_mixtral_formula():
    """docs/references.md: V h + V h + h + L [attention + 2h + h E + E 3 h I]."""
    cfg = presets.mixtral_8x7b()
    V, h, L = cfg.vocab_size, cfg.embed_dim, cfg.num_layers  # noqa: N806
    E, I = cfg.moe.num_experts, cfg.moe.expert_dim  # noqa: E741,N806
    d, nq, nkv = cfg.resolved_head_dim, cfg.num_heads, cfg.num_kv_heads
    counts, active = calculator.param_counts(cfg)
    assert counts == {
        "embedding": V * h,
        "attention": L * (h * nq * d + 2 * h * nkv * d + nq * d * h),
        "experts": L * E * 3 * h * I,
        "router": L * h * E,
        "norms": L * 2 * h + h,
        "head": V * h,
    }
    assert active["experts"] == L * 2 * 3 * h * I


def test_vision_counts_the_patch_projection_and_the_row_and_column_tables():
    """(p^2 C + 1) h for the projection and its bias, 2 g h for the tables; no matmul FLOPs
    for a text token."""
    text = presets.llama3_1b()
    cfg = dataclasses.replace(text, vision=VisionConfig(image_size=64, patch_size=8))
    h, g, width = cfg.embed_dim, 64 // 8, 8 * 8 * 3
    counts, active = calculator.param_counts(cfg)
    assert counts["vision"] == active["vision"] == (width + 1) * h + 2 * g * h
    assert counts == {**calculator.param_counts(text)[0], "vision": counts["vision"]}
    assert (flops.matmul_params(cfg, sum(counts.values()))
            == flops.matmul_params(text, sum(counts.values()) - counts["vision"]))


@pytest.mark.parametrize("preset, qk_width, value_width", [
    (presets.llama3_8b, 128, 128),  # PaLM's 12 * L * H * d_head * S
    (presets.deepseek_v3, 128 + 64, 128),  # MLA: nope + rope query/key heads, narrower values
])
def test_attention_flops_count_query_key_and_value_widths(preset, qk_width, value_width):
    """PaLM appendix B: per layer and token, 2 * S * d_qk (scores) plus 2 * S * d_v (values)
    per head forward, three times that with the backward."""
    cfg, seq_len, num_params = preset(), 4096, 10**9
    attention = (flops.train_flops_per_token(cfg, num_params, seq_len)
                 - 6 * flops.matmul_params(cfg, num_params))
    expected = 3 * 2 * cfg.num_layers * cfg.num_heads * (qk_width + value_width) * seq_len
    assert attention == expected


def test_kv_cache_is_two_by_layers_kv_heads_head_dim():
    for cfg in (presets.llama3_8b(), presets.tiny_mixtral()):
        bytes_per_value = np.dtype(cfg.dtype).itemsize
        expected = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim * bytes_per_value
        assert calculator.kv_cache_bytes_per_token(cfg) == expected


def _memory(model, **mesh):
    config = Config(model=model, mesh=MeshConfig(**mesh), train=TrainConfig(batch_size=8))
    return calculator.memory(config, dict(MeshConfig(**mesh).shape))


def test_fsdp_divides_exactly_the_tensors_with_an_embed_axis():
    """RULES put `embed` on fsdp: those tensors shrink by the fsdp size, the rest (norms)
    stay whole. AdamW keeps two float32 moments per parameter plus two int32 step counts."""
    cfg = presets.tiny_dense()
    boxes = jax.tree.leaves(calculator.boxed_params(cfg),
                            is_leaf=lambda x: isinstance(x, nn.Partitioned))
    params = []
    for fsdp in (1, 2, 4, 8):
        expected = 4 * sum(math.prod(b.value.shape) // (fsdp if "embed" in b.names else 1)
                           for b in boxes)
        mem = _memory(cfg, data=8 // fsdp, fsdp=fsdp)
        assert mem.params == mem.grads == expected
        assert mem.optimizer == 2 * expected + 2 * 4
        params.append(mem.params)
    assert params == sorted(params, reverse=True) and len(set(params)) == 4
    assert _memory(cfg, data=4, tensor=2).params < params[0]


def test_per_device_bytes_equal_the_real_sharded_state():
    """Every device of a real 8-device sharded init holds exactly the calculated bytes."""
    config = Config(model=presets.tiny_mixtral(),
                    mesh=MeshConfig(data=1, fsdp=2, tensor=2, expert=2),
                    train=TrainConfig(batch_size=8))
    mem = calculator.memory(config, dict(config.mesh.shape))
    state, _ = init_state(Transformer(config.model), make_optimizer(config.train), 8,
                          make_mesh(config), jax.random.key(0))
    for tree, expected in ((state.params, mem.params), (state.opt_state, mem.optimizer)):
        per_device = {}
        for leaf in jax.tree.leaves(tree):
            for shard in leaf.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        assert len(per_device) == 8
        assert set(per_device.values()) == {expected}


def test_activations_shrink_with_remat_and_grow_with_batch():
    model = presets.tiny_dense()

    def activations(remat, batch):
        config = Config(model=dataclasses.replace(model, remat=remat),
                        train=TrainConfig(batch_size=batch))
        return calculator.activation_bytes(config, MeshConfig(data=8).shape)

    assert activations("none", 16) > activations("save_dots", 16) > activations("full", 16)
    assert activations("full", 32) == 2 * activations("full", 16)


def test_chinchilla_and_planner():
    report = calculator.calculate(Config(model=presets.tiny_dense()), 1)
    assert report.chinchilla_tokens == 20 * report.total_params
    assert report.chinchilla_flops == 6 * report.active_params * report.chinchilla_tokens
    plan = calculator.compute_optimal(5.76e23)  # Chinchilla's own budget: 70B on 1.4T tokens
    assert plan["tokens"] == pytest.approx(20 * plan["params"])
    assert 6 * plan["params"] * plan["tokens"] == pytest.approx(5.76e23)
    assert plan["params"] == pytest.approx(69.3e9, rel=0.01)
    with pytest.raises(ValueError, match="budget_flops"):
        calculator.compute_optimal(0)


@pytest.mark.parametrize("name, chip, devices", [
    ("tpu_v5e_8", "v5e", 8),
    ("tpu_v5p_128", "v5p", 64),
    ("tpu_v5e_256x2", "v5e", 512),
])
def test_tpu_experiments_fit_their_chips(name, chip, devices):
    config = load_experiment(EXPERIMENTS / f"{name}.py")
    mem = calculator.memory(config, validate_for_devices(config, devices))
    assert 0 < mem.params and mem.total < calculator.HBM_BYTES[chip]


def test_cli_prints_a_table_and_json(capsys):
    assert cli.main(["params", "tiny_mixtral", "mesh.fsdp=2", "--devices", "8"]) == 0
    table = capsys.readouterr().out
    assert "experts" in table and "per device: params" in table and "fsdp=2" in table
    assert cli.main(["params", "tiny_mixtral", "mesh.fsdp=2", "--devices", "8", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    expected = calculator.calculate(
        Config(model=presets.tiny_mixtral(), mesh=MeshConfig(fsdp=2)), 8
    )
    assert figures["total_params"] == expected.total_params
    assert figures["memory"]["total"] == expected.memory.total
    assert figures["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1, "expert": 1, "context": 1}
    assert cli.main(["params", "--budget", "1e21", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] == 1e21
    assert cli.main(["params", "no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err


def test_preset_table_rows_and_fit():
    rows = calculator.preset_rows(["llama3_8b", "mixtral_8x22b"])
    assert [r["preset"] for r in rows] == ["llama3_8b", "mixtral_8x22b"]
    llama, mixtral = rows
    assert llama["total"] == 8_030_261_248 and llama["mesh"] == "fsdp=256, expert=1"
    assert llama["fits_v5e"] and llama["fits_v5p"]
    assert mixtral["mesh"] == "fsdp=32, expert=8"
    assert not mixtral["fits_v5e"] and mixtral["fits_v5p"]  # 18 GiB per chip
    assert "| llama3_8b | 8.03B |" in calculator.format_presets(rows)


def test_fp8_estimate_counts_the_projection_and_ffn_matmuls():
    """tiny_dense: per layer q and o (d x H dh), k and v (d x K dh), the SwiGLU 3 d F."""
    model = dataclasses.replace(presets.tiny_dense(), fp8="blockwise", fp8_block_size=64,
                                dtype="bfloat16")
    report = calculator.calculate(Config(model=model, train=TrainConfig(batch_size=8)), 8)
    d, f, dh = model.embed_dim, model.mlp_dim, model.resolved_head_dim
    per_layer = 2 * d * model.num_heads * dh + 2 * d * model.num_kv_heads * dh + 3 * d * f
    matmul = model.num_layers * per_layer
    e = report.fp8
    assert e.active_params == matmul
    assert e.flops_share == pytest.approx(6 * matmul / report.train_flops_per_token)
    assert e.weight_bytes == matmul + 4 * math.ceil(matmul / 64**2)
    assert e.compute_weight_bytes == 2 * matmul
    assert e.step_time_bound == pytest.approx(1 - e.flops_share / 2)
    assert "fp8 (est.)" in calculator.format_report(report)
    assert calculator.calculate(Config(model=presets.tiny_dense()), 8).fp8 is None
