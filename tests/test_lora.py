"""LoRA: a fresh adapter is the base model exactly, merging folds it in, only adapters train
(SFT and GRPO steps) and the optimizer keeps moments for them alone; a LoRA run starts from a
base workdir, resumes, and exports its merged weights."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from helpers import abstract_params, arithmetic_batch, init_params, tiny_model
from runs import quiet, run_config

from jaxllm import Config, ConfigError, MeshConfig, TrainConfig, calculator
from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.config import GRPOConfig, LoRAConfig
from jaxllm.nn import Transformer
from jaxllm.nn import lora as lora_lib
from jaxllm.rl.step import jit_grpo_step
from jaxllm.train.optimizer import make_optimizer
from jaxllm.train.state import abstract_state, init_state
from jaxllm.train.step import jit_train_step

LORA = LoRAConfig(rank=4, alpha=8.0)
BASE = tiny_model(embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
ADAPTED = dataclasses.replace(BASE, lora=LORA)
TOKENS = np.random.default_rng(0).integers(0, 384, (2, 8)).astype(np.int32)
LEARNING_RATE = 0.1
PROJECTIONS = {"q": ("attn", "query"), "k": ("attn", "key"), "v": ("attn", "value"),
               "o": ("attn", "out"), "mlp": ("mlp", "wi")}


def logits(config, params):
    return jax.jit(Transformer(config).apply)({"params": params}, TOKENS)


def leaves_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def adapted_kernels(params) -> set[tuple[str, ...]]:
    """The paths of the kernels that carry an adapter."""
    adapters, _ = lora_lib.split(params)
    return {path[:-2] for path in traverse_util.flatten_dict(adapters)}


def with_random_b(params, seed: int = 1):
    """`params` with every adapter's B drawn at random, so that adapters change the model."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: rng.normal(0, 0.2, x.shape).astype(x.dtype)
        if path[-1].key == "b" else x, params)


def test_a_fresh_adapter_leaves_the_model_exactly_the_base_model():
    params, base = init_params(Transformer(ADAPTED)), init_params(Transformer(BASE))
    adapters, rest = lora_lib.split(params)
    assert leaves_equal(rest, base)  # the base weights draw the same init keys
    assert all(np.all(b == 0) for b in jax.tree.leaves(adapters)[1::2])  # a, b per kernel
    np.testing.assert_array_equal(logits(ADAPTED, params), logits(BASE, base))


@pytest.mark.parametrize("targets", ["q,k,v,o,mlp", "v,o", "q,mlp"])
def test_adapters_sit_on_the_named_projections_only(targets):
    config = dataclasses.replace(BASE, lora=LoRAConfig(rank=4, targets=targets))
    expected = {("decoder", "layers", *PROJECTIONS[t]) for t in targets.split(",")}
    expected |= {("decoder", "layers", "mlp", "wo")} if "mlp" in targets else set()
    params = abstract_params(Transformer(config))
    assert adapted_kernels(params) == expected
    for path in expected:
        node = traverse_util.flatten_dict(params)
        kernel, a, b = (node[(*path, *name)] for name in (("kernel",), ("lora", "a"),
                                                            ("lora", "b")))
        num_in = a.ndim - 1  # [L, in..., r] and [L, r, out...] around [L, in..., out...]
        assert a.shape == (*kernel.shape[:num_in], 4)
        assert b.shape == (kernel.shape[0], 4, *kernel.shape[num_in:])


def test_merging_folds_each_adapter_into_its_kernel():
    """merge gives W + (alpha / r) A B per kernel, and the merged base model computes the
    adapted model's logits."""
    params = with_random_b(init_params(Transformer(ADAPTED)))
    merged = lora_lib.merge(params, LORA)
    query = params["decoder"]["layers"]["attn"]["query"]  # [L, E, H, D], A [L, E, r]
    a, b = query["lora"]["a"], query["lora"]["b"]
    for layer in range(BASE.num_layers):
        delta = a[layer] @ b[layer].reshape(LORA.rank, -1) * LORA.alpha / LORA.rank
        np.testing.assert_allclose(
            merged["decoder"]["layers"]["attn"]["query"]["kernel"][layer],
            query["kernel"][layer] + delta.reshape(query["kernel"].shape[1:]), atol=1e-6)
    assert jax.tree.structure(merged) == jax.tree.structure(init_params(Transformer(BASE)))
    ours = logits(ADAPTED, params)
    assert np.abs(ours - logits(BASE, lora_lib.split(params)[1])).max() > 0.1
    np.testing.assert_allclose(logits(BASE, merged), ours, atol=1e-5)


@pytest.mark.parametrize("override, field", [
    ("model.lora.targets=q,x", "model.lora.targets"),
    ("model.lora.targets=q,q", "model.lora.targets"),
    ("model.lora.rank=-1", "model.lora.rank"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.attention.mla.kv_lora_rank=16", "model.lora.targets"),
])
def test_bad_lora_configs_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        config_lib.apply_overrides(Config(), ["model.lora.rank=4", override])


def test_rank_zero_is_off():
    config = config_lib.apply_overrides(Config(), ["model.lora.rank=0"])
    assert config.model.active_lora is None
    assert not adapted_kernels(abstract_params(Transformer(config.model)))


def test_the_optimizer_keeps_moments_for_adapters_only():
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=1)), jax.devices()[:1])
    tx = make_optimizer(TrainConfig(steps=2))
    state = abstract_state(Transformer(ADAPTED), tx, 8, mesh)
    adapters, _ = lora_lib.split(state.params)
    adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    shapes = [x.shape for x in jax.tree.leaves(adapters)]
    for moment in (adam.mu, adam.nu):
        assert jax.tree.structure(moment) == jax.tree.structure(adapters)
        assert [x.shape for x in jax.tree.leaves(moment)] == shapes
    sizes = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert sizes == 2 * sum(x.size for x in jax.tree.leaves(adapters))


def test_jaxllm_params_counts_the_adapters_apart():
    total, _ = calculator.param_counts(ADAPTED)
    adapters, _ = lora_lib.split(abstract_params(Transformer(ADAPTED)))
    assert total.pop("adapters") == sum(x.size for x in jax.tree.leaves(adapters))
    assert total == calculator.param_counts(BASE)[0]


def sharded_state(mesh_config: MeshConfig, tx, seq_len: int):
    devices = jax.devices()[:max(mesh_config.data, 1) * mesh_config.fsdp * mesh_config.tensor]
    mesh = parallel.make_mesh(Config(mesh=mesh_config), devices)
    state, shardings = init_state(Transformer(ADAPTED), tx, seq_len, mesh, jax.random.key(0))
    return mesh, state, shardings


def test_an_sft_step_trains_the_adapters_by_the_chain_rule():
    """One SGD step of the SFT (pretraining) step on a 2x2x2 mesh: the base weights stay
    bit-equal; B moves by -lr (alpha / r) A^T dL/dW, dL/dW the gradient of the base kernel
    in the same model (B = 0, so A's gradient is zero)."""
    tx, batch = optax.sgd(LEARNING_RATE), arithmetic_batch(seq_len=16)
    mesh, state, shardings = sharded_state(MeshConfig(data=2, fsdp=2, tensor=2), tx, 16)
    start = jax.device_get(state.params)
    with parallel.use_mesh(mesh):
        step = jit_train_step(Transformer(ADAPTED), tx, TrainConfig(), optax.constant_schedule(
            LEARNING_RATE), mesh, shardings)
        state, metrics = step(state, batch)
    after = jax.device_get(state.params)
    assert leaves_equal(lora_lib.split(after)[1], lora_lib.split(start)[1])

    def mean_nll(params):
        logits = Transformer(BASE).apply({"params": params}, batch["inputs"],
                                         batch["positions"], batch["segment_ids"])
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        return (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()

    np.testing.assert_allclose(metrics["loss"], jax.jit(mean_nll)(lora_lib.split(start)[1]),
                               rtol=1e-5)
    kernel_grads = jax.jit(jax.grad(mean_nll))(lora_lib.split(start)[1])
    for path in adapted_kernels(start):
        node = traverse_util.flatten_dict(start)
        a, b = (node[(*path, "lora", n)] for n in ("a", "b"))
        g = traverse_util.flatten_dict(kernel_grads)[(*path, "kernel")]
        layers, rank = a.shape[0], a.shape[-1]
        g = g.reshape(layers, a[0].size // rank, -1)  # [L, in, out], in and out flattened
        db = np.einsum("lir,lio->lro", a.reshape(layers, -1, rank), g)
        db = db.reshape(b.shape) * LORA.alpha / LORA.rank
        moved = traverse_util.flatten_dict(after)[(*path, "lora", "b")]
        np.testing.assert_allclose(moved, -LEARNING_RATE * db, atol=2e-6, err_msg=str(path))
        np.testing.assert_array_equal(traverse_util.flatten_dict(after)[(*path, "lora", "a")], a)


def test_a_grpo_step_changes_only_the_adapters():
    cfg, (b, s) = GRPOConfig(group_size=2, beta=0.0), (8, 12)
    rng = np.random.default_rng(0)
    t = np.arange(s)
    batch = {"tokens": rng.integers(0, 384, (b, s)).astype(np.int32),
             "positions": np.broadcast_to(t, (b, s)).astype(np.int32),
             "segment_ids": np.ones((b, s), np.int32),
             "completion_mask": np.broadcast_to(t >= 4, (b, s)).astype(np.int32),
             "advantages": np.array([1, -1] * (b // 2), np.float32),
             "sampler_logprobs": rng.normal(-3, 0.1, (b, s)).astype(np.float32)}
    tx = optax.sgd(LEARNING_RATE)
    mesh, state, shardings = sharded_state(MeshConfig(data=1), tx, s)
    start = jax.device_get(state.params)
    with parallel.use_mesh(mesh):
        step = jit_grpo_step(Transformer(ADAPTED), tx, cfg, optax.constant_schedule(
            LEARNING_RATE), mesh, shardings)
        state, metrics = step(state, batch)
    (adapters, base), (adapters0, base0) = (lora_lib.split(jax.device_get(state.params)),
                                            lora_lib.split(start))
    assert leaves_equal(base, base0)
    moved = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(adapters),
                                                      jax.tree.leaves(adapters0))]
    assert moved == [False, True] * (len(moved) // 2)  # every B moves; A's gradient is 0
    assert metrics["grad_norm"] > 0


def chat_file(path) -> str:
    lines = [{"prompt": f"{i}+{i}=?", "response": f"{2 * i}"} for i in range(16)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


@pytest.mark.slow
def test_a_lora_sft_run_starts_from_a_base_workdir_resumes_and_exports_merged(tmp_path):
    """SFT with model.lora from a pretraining workdir (no adapters in its checkpoint): the
    base weights stay those of the workdir; the run stops, resumes exactly; `jaxllm convert
    hf-export` writes the merged weights, and the model read back from them computes the
    LoRA model's logits."""
    from jaxllm.cli import main
    from jaxllm.convert.hf_config import from_hf
    from jaxllm.convert.hf_files import read_json
    from jaxllm.convert.hf_import import load_variables
    from jaxllm.train.run import load_run
    from jaxllm.train.sft import sft

    from jaxllm.train.loop import pretrain

    pretrain(run_config(tmp_path / "pre", steps=1, seq_len=32), log=quiet)
    config = dataclasses.replace(
        run_config(tmp_path / "sft", steps=4, seq_len=32, learning_rate=1e-2, every=2),
        model=dataclasses.replace(tiny_model(), lora=LORA), init_from=str(tmp_path / "pre"),
        data=config_lib.DataConfig(source="chat", paths=chat_file(tmp_path / "c.jsonl"),
                                   eval_split=None))
    logs = []
    first = sft(config, log=logs.append, stop_after=2)
    assert any("starting from the weights in" in line for line in logs)
    resumed = sft(config, log=quiet)
    assert [r["step"] for r in first + resumed] == [1, 2, 3, 4]
    _, _, pre = load_run(tmp_path / "pre")
    _, model, state = load_run(tmp_path / "sft")
    adapters, base = lora_lib.split(state.params)
    assert leaves_equal(base, pre.params)
    assert all(np.abs(b).max() > 0 for b in jax.tree.leaves(adapters)[1::2])

    out = tmp_path / "hf"
    assert main(["convert", "hf-export", str(tmp_path / "sft"), "--family", "llama",
                 "--out", str(out)]) == 0
    merged_model = from_hf(read_json(out / "config.json"))
    mesh = parallel.make_mesh(Config(mesh=MeshConfig(data=1)), jax.devices()[:1])
    variables = load_variables(out, merged_model, mesh, log=quiet)
    tokens = TOKENS % merged_model.vocab_size
    np.testing.assert_allclose(Transformer(merged_model).apply(variables, tokens),
                               model.apply({"params": state.params}, tokens), atol=1e-5)


@pytest.mark.slow
def test_a_lora_grpo_run_trains_only_adapters(tmp_path):
    from jaxllm.data import tasks
    from jaxllm.data.tokenizer import ByteTokenizer
    from jaxllm.rl.loop import grpo
    from jaxllm.train.loop import pretrain
    from jaxllm.train.run import load_run

    model = tiny_model(vocab_size=ByteTokenizer().vocab_size, embed_dim=32, mlp_dim=64)
    pre = dataclasses.replace(run_config(tmp_path / "pre", steps=1, seq_len=32), model=model)
    pretrain(pre, log=quiet)
    config = Config(
        model=dataclasses.replace(model, lora=LORA),
        mesh=MeshConfig(data=2, fsdp=4), data=config_lib.DataConfig(source="arithmetic"),
        train=TrainConfig(steps=2, batch_size=16, learning_rate=1e-2, warmup_steps=0),
        grpo=GRPOConfig(group_size=8, max_completion_len=6, eval_every=0, beta=0.04),
        workdir=str(tmp_path / "rl"), init_from=str(tmp_path / "pre"))
    problems = [tasks.Problem("toy", f"{a}+{a}=?", str(2 * a)) for a in range(8)]
    history = grpo(config, log=quiet, problems=problems,
                   reward_fns=[lambda prompts, completions, **_: [len(c) for c in completions]])
    assert len(history) == 2
    _, _, before = load_run(tmp_path / "pre")
    _, _, after = load_run(tmp_path / "rl")
    adapters, base = lora_lib.split(after.params)
    assert leaves_equal(base, before.params)
    assert any(np.abs(b).max() > 0 for b in jax.tree.leaves(adapters)[1::2])
