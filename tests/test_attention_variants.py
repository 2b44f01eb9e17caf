"""Masks, ALiBi and the kernels against a dense reference that builds each mask by hand;
the blockwise kernel's memory and the strided pattern's FLOPs from XLA; per-layer patterns
in whole models, trained and decoded."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_model
from jaxllm import config as config_lib
from jaxllm.config import AttentionConfig, ConfigError
from jaxllm.nn import Mask, Transformer, alibi_slopes, attend
from jaxllm.nn.masks import row_indices
from jaxllm import MeshConfig, calculator, presets
from jaxllm.infer import init_cache
from jaxllm.train.loop import pretrain
from jaxllm.nn.transformer import layer_kinds, layer_segments
from test_infer import cached_and_recomputed, random_variables

ROOT = Path(__file__).parent.parent
B, S, H, K, D = 2, 32, 4, 2, 8
SEGMENTS = np.array([[1] * 20 + [2] * 12, [1] * 32])
MASKS = {
    "global": Mask(),
    "sliding": Mask("sliding", window=5),
    "chunked": Mask("chunked", chunk=12),
    "strided": Mask("strided", window=4, stride=6),
}


def reference_mask(kind: str, segments: np.ndarray) -> np.ndarray:
    """[B, S, S] written out by the definitions, one query and key at a time."""
    out = np.zeros((len(segments), S, S), bool)
    for b, i, j in np.ndindex(out.shape):
        seen = {
            "global": True,
            "sliding": i - j < 5,
            "chunked": i // 12 == j // 12,
            "strided": i - j < 4 or j % 6 == 5,
        }[kind]
        out[b, i, j] = j <= i and segments[b, i] == segments[b, j] and seen
    return out


def reference(q, k, v, mask, slopes=None):
    """Plain softmax attention with repeated kv heads and an explicit mask and bias."""
    k, v = (jnp.repeat(x, H // K, axis=2) for x in (k, v))
    s = jnp.einsum("bthd,bshd->bhts", q, k) * D**-0.5
    if slopes is not None:
        distance = np.arange(S)[:, None] - np.arange(S)[None, :]
        s = s - jnp.asarray(slopes)[:, None, None] * distance
    s = jnp.where(mask[:, None], s, -1e30)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


def qkv(seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (B, S, h, D)) for key, h in zip(keys, (H, K, K)))


CASES = [(kind, kernel, False) for kind in MASKS for kernel in ("naive", "blockwise")] + [
    ("sliding", "blockwise", True), ("strided", "naive", True), ("global", "backend", True)]


@pytest.mark.parametrize("kind, kernel, alibi", CASES)
def test_kernels_equal_the_hand_built_mask_on_values_and_gradients(kind, kernel, alibi):
    slopes = alibi_slopes(H) if alibi else None
    seg = jnp.asarray(SEGMENTS)
    idx = row_indices(seg)

    def ours(q, k, v):
        return attend(q, k, v, idx, seg, idx, seg, mask=MASKS[kind], slopes=slopes,
                      kernel=kernel, block_size=8)

    def theirs(q, k, v):
        return reference(q, k, v, reference_mask(kind, SEGMENTS), slopes)

    q, k, v = qkv()
    cotangent = jax.random.normal(jax.random.key(9), (B, S, H, D))

    @jax.jit
    def outputs_and_grads(q, k, v):
        results = []
        for f in (ours, theirs):
            out, vjp = jax.vjp(f, q, k, v)
            results.append((out, *vjp(cotangent)))
        return results

    got, want = outputs_and_grads(q, k, v)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(x, y, atol=2e-5, err_msg=name)


def _compiled(kernel, length, mask=Mask()):
    """fwd+bwd of one attention call at `length`, compiled (no run)."""
    q = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
    seg = jnp.ones((1, length), jnp.int32)
    idx = row_indices(seg)

    def loss(q):
        return attend(q, q, q, idx, seg, idx, seg, mask=mask, kernel=kernel, block_size=64).sum()

    return jax.jit(jax.grad(loss)).lower(q).compile()


def test_blockwise_memory_grows_linearly_and_naive_quadratically():
    def growth(kernel):
        small, large = (_compiled(kernel, n).memory_analysis().temp_size_in_bytes
                        for n in (512, 1024))
        return large / small

    assert growth("blockwise") < 2.3
    assert growth("naive") > 3.5


def test_strided_flops_scale_like_s_times_window_plus_s_over_stride():
    window, stride, block = 32, 64, 64
    mask = Mask("strided", window=window, stride=stride)

    def flops(kernel, n):
        return _compiled(kernel, n, mask).cost_analysis()["flops"]

    def predicted(n):  # tiles per query: the sliding diagonals, then the strided keys
        return n * (2 * block + -(-(n // stride) // block) * block)

    ratio = flops("blockwise", 2048) / flops("blockwise", 1024)
    assert ratio == pytest.approx(predicted(2048) / predicted(1024), rel=0.1)
    assert ratio < 2.5
    assert flops("naive", 2048) / flops("naive", 1024) > 3.8


LLAMA4 = AttentionConfig(pattern="chunked,chunked,chunked,global", positions="rope,rope,rope,none",
                         chunk=6)


def test_layer_pattern_scans_its_shortest_repeating_group():
    moe = config_lib.MoEConfig(num_experts=4, expert_dim=32, moe_every=2)
    cfg = tiny_model(num_layers=8, moe=moe, attention=LLAMA4)
    kinds = layer_kinds(cfg)
    assert [k.attention for k in kinds[:4]] == ["chunked"] * 3 + ["global"]
    assert [k.position for k in kinds[:4]] == ["rope"] * 3 + ["none"]
    assert [k.moe for k in kinds[:4]] == [False, True, False, True]
    (name, group, repeats), = layer_segments(cfg)
    assert (name, group, repeats) == ("layers", kinds[:4], 2)


def test_scanned_and_unrolled_patterned_stacks_compute_the_same():
    attention = AttentionConfig(pattern="sliding,strided,global", positions="alibi,rope,none",
                                window=3, stride=4)
    cfg = tiny_model(num_layers=3, attention=attention)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 384, (2, 16)), jnp.int32)
    variables = random_variables(Transformer(cfg))
    scanned = Transformer(cfg).apply(variables, tokens)
    unrolled_cfg = tiny_model(num_layers=3, attention=attention, scan_layers=False)
    group = variables["params"]["decoder"]["layers"]
    unrolled = {f"layers_{i}": jax.tree.map(lambda x: x[0], group[f"block_{i}"]) for i in range(3)}
    params = {**variables["params"], "decoder": unrolled}
    np.testing.assert_allclose(
        Transformer(unrolled_cfg).apply({"params": params}, tokens), scanned, atol=1e-5)


DECODE = {
    "sliding_alibi": tiny_model(attention=AttentionConfig(
        pattern="sliding,global", positions="alibi", window=3)),
    "chunked_nope_l2": tiny_model(num_layers=4, attention=dataclasses.replace(
        LLAMA4, qk_norm="l2")),
    "strided_yarn_rms": tiny_model(attention=AttentionConfig(
        pattern="strided", window=2, stride=3, rope_scaling="yarn", rope_factor=4.0,
        rope_original_len=8, qk_norm="rms")),
    "mla_sparse": tiny_model(num_kv_heads=8, attention=AttentionConfig(
        pattern="global,sparse", mla=config_lib.MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8,
                                                          qk_rope_head_dim=4, v_head_dim=8),
        sparse=config_lib.SparseConfig(top_k=4, indexer_heads=2, indexer_head_dim=8))),
}


@pytest.mark.parametrize("name", list(DECODE))
def test_cached_decode_equals_full_recompute_for_each_pattern(name):
    model = Transformer(DECODE[name])
    np.testing.assert_allclose(*cached_and_recomputed(model, random_variables(model)), atol=1e-5)


def test_sliding_layers_cache_a_ring_of_window_slots():
    cfg = tiny_model(attention=AttentionConfig(pattern="sliding,global", window=3))
    cache = init_cache(Transformer(cfg), batch_size=2, cache_len=64)["decoder"]["layers"]
    assert cache["block_0"]["attn"]["cached_key"].shape == (1, 2, 3, 4, 8)  # [layers, B, w, K, D]
    assert cache["block_1"]["attn"]["cached_key"].shape == (1, 2, 64, 4, 8)
    global_only = calculator.kv_cache_bytes_per_token(tiny_model(num_layers=1))
    assert calculator.kv_cache_bytes_per_token(cfg) == global_only  # the ring does not grow
    assert calculator.kv_cache_bytes(cfg, 64) == (64 + 3) * global_only + 3 * 4  # + positions


def test_blockwise_model_equals_naive_model_with_the_same_params():
    attention = AttentionConfig(pattern="sliding,global", positions="alibi,rope", window=5,
                                block_size=8)
    naive = Transformer(tiny_model(attention=attention))
    blockwise = Transformer(
        tiny_model(attention=dataclasses.replace(attention, kernel="blockwise")))
    variables = random_variables(naive)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 384, (2, 32)), jnp.int32)
    segments = jnp.asarray(SEGMENTS)
    np.testing.assert_allclose(blockwise.apply(variables, tokens, segment_ids=segments),
                               naive.apply(variables, tokens, segment_ids=segments), atol=1e-5)


def test_bad_attention_config_names_the_field():
    with pytest.raises(ConfigError, match="model.attention.pattern"):
        config_lib.validate(config_lib.Config(model=tiny_model(
            attention=AttentionConfig(pattern="global,slidng"))))
    with pytest.raises(ConfigError, match="model.attention.sparse"):
        config_lib.validate(config_lib.Config(model=tiny_model(
            attention=AttentionConfig(pattern="sparse"))))
    config = config_lib.apply_overrides(config_lib.Config(), [
        "model.attention.pattern=sliding,global", "model.attention.mla.kv_lora_rank=16",
        "model.num_kv_heads=4"])
    assert config_lib.from_dict(config_lib.to_dict(config)) == config


@pytest.mark.slow
@pytest.mark.parametrize("name", [  # the tiny MoE experiments learn in test_moe_model
    "tiny_local", "tiny_qwen3", "tiny_llama4_scout", "tiny_deepseek_v32"])
def test_tiny_presets_take_a_sharded_train_step(name):
    model = presets.PRESETS[name]()
    mesh = MeshConfig(data=2, expert=4) if model.moe else MeshConfig(data=4, fsdp=2)
    config = config_lib.Config(
        model=model, mesh=mesh, data=config_lib.DataConfig(source="arithmetic"),
        train=config_lib.TrainConfig(steps=1, batch_size=8, seq_len=64, warmup_steps=0,
                                     eval_every=0, log_every=1))
    (metrics,) = pretrain(config, log=lambda line: None)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    if model.attention.sparse is not None:  # the indexer's loss joins the training loss
        assert metrics["indexer_loss"] > 0
