"""The MoE layer against a plain loop over experts; routing, balancing and capacity rules."""

import dataclasses
import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import Config, ConfigError, MoEConfig
from jaxllm import config as config_lib
from jaxllm.nn import router
from jaxllm.nn.experts import KERNELS, routed_experts
from jaxllm.nn.moe import MoE

ROUTINGS = {
    "softmax_top2": MoEConfig(num_experts=4, experts_per_token=2, expert_dim=16),
    "sigmoid_groups_bias": MoEConfig(
        num_experts=8, experts_per_token=3, expert_dim=16, router="sigmoid", n_group=4,
        topk_group=2, routed_scaling_factor=2.5,
    ),
    "shared_sigmoid_top1": MoEConfig(
        num_experts=4, experts_per_token=1, expert_dim=16, router="sigmoid",
        norm_topk_prob=False, num_shared_experts=2, shared_expert_dim=8,
    ),
}


def reference_choices(logits: np.ndarray, bias: np.ndarray, cfg: MoEConfig) -> np.ndarray:
    """Token by token: the experts chosen, [T, K]."""
    choices = []
    for row in logits:
        if cfg.router == "softmax":
            choices.append(np.argsort(-row)[: cfg.experts_per_token])
            continue
        selection = 1 / (1 + np.exp(-row)) + bias
        size = cfg.num_experts // cfg.n_group
        groups = selection.reshape(cfg.n_group, size)
        group_scores = np.sort(groups, axis=-1)[:, -2:].sum(-1) if cfg.n_group > 1 else np.zeros(1)
        kept = np.argsort(-group_scores)[: cfg.topk_group]
        candidates = np.concatenate([np.arange(g * size, (g + 1) * size) for g in kept])
        best = np.argsort(-selection[candidates])[: cfg.experts_per_token]
        choices.append(candidates[best])
    return np.array(choices)


def swiglu(x, wi, wo):
    gate_up = jnp.einsum("td,dgf->tgf", x, wi)
    return (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]) @ wo


def reference_moe(params, x, choices, cfg: MoEConfig):
    """Every expert on every token in a Python loop, masked to the tokens that chose it."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ params["router"]["kernel"]
    chosen = jnp.take_along_axis(logits, choices, axis=-1)
    if cfg.router == "softmax":  # Mixtral: softmax over the top-k logits
        weights = jax.nn.softmax(chosen, axis=-1)
    else:  # DeepSeek-V3: the unbiased sigmoid of the chosen experts
        weights = jax.nn.sigmoid(chosen)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdims=True)
    weights = weights * cfg.routed_scaling_factor
    out = jnp.zeros_like(tokens)
    for e in range(cfg.num_experts):
        gate = jnp.sum(jnp.where(choices == e, weights, 0.0), axis=-1)  # [T]
        out = out + gate[:, None] * swiglu(tokens, params["wi"][e], params["wo"][e])
    if cfg.num_shared_experts:
        shared = params["shared"]
        out = out + swiglu(tokens, shared["wi"]["kernel"], shared["wo"]["kernel"])
    return out.reshape(x.shape)


def init_moe(cfg: MoEConfig, x, bias_seed: int | None = None):
    variables = nn.meta.unbox(jax.jit(MoE(cfg).init)(jax.random.key(1), x))
    variables.pop("moe_metrics")
    if bias_seed is not None:
        bias = 0.3 * jax.random.normal(jax.random.key(bias_seed), (cfg.num_experts,))
        variables["moe_bias"] = {"e_score_correction_bias": bias}
    return variables


def value_and_grads(fn, params, x, cotangent):
    return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(fn(p, x) * cotangent), argnums=(0, 1)))(
        params, x
    )


@pytest.mark.parametrize("kernel", ["ragged_dot", "tiled"])  # the others agree: below
@pytest.mark.parametrize("name", ROUTINGS)
def test_dropless_moe_matches_a_loop_over_experts(name, kernel):
    cfg = dataclasses.replace(ROUTINGS[name], kernel=kernel)
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    variables = init_moe(cfg, x, bias_seed=2 if cfg.router == "sigmoid" else None)
    bias = variables.get("moe_bias", {}).get("e_score_correction_bias", np.zeros(cfg.num_experts))
    logits = np.asarray(x.reshape(16, 16) @ variables["params"]["router"]["kernel"])
    choices = jnp.asarray(reference_choices(logits, np.asarray(bias), cfg))
    cotangent = jax.random.normal(jax.random.key(3), x.shape)

    def moe(params, x):
        return MoE(cfg).apply({**variables, "params": params}, x)

    got, got_grads = value_and_grads(moe, variables["params"], x, cotangent)
    want, want_grads = value_and_grads(
        lambda p, x: reference_moe(p, x, choices, cfg), variables["params"], x, cotangent
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got_grads, want_grads
    )


def test_deepseek_gate_is_the_normalised_unbiased_sigmoid_and_bias_only_selects():
    cfg = MoEConfig(num_experts=4, experts_per_token=2, router="sigmoid", routed_scaling_factor=2.5)
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    s = np.asarray(jax.nn.sigmoid(logits[0]))
    route = jax.jit(router.route, static_argnums=2)

    weights, experts, _ = route(logits, jnp.zeros(4), cfg)
    np.testing.assert_array_equal(experts, [[0, 1]])
    np.testing.assert_allclose(weights, [2.5 * s[:2] / s[:2].sum()], rtol=1e-6)

    # A bias too small to change the choice leaves the weights exactly as they were.
    same_weights, same_experts, _ = route(logits, jnp.array([0.0, 0.1, 0.2, 0.0]), cfg)
    np.testing.assert_array_equal(same_experts, experts)
    np.testing.assert_array_equal(same_weights, weights)

    # A bias that changes the choice: expert 3 is picked, weighted by its unbiased score.
    weights, experts, _ = route(logits, jnp.array([0.0, 0.0, 0.0, 1.0]), cfg)
    np.testing.assert_array_equal(experts, [[3, 0]])
    np.testing.assert_allclose(weights, [2.5 * s[[3, 0]] / s[[3, 0]].sum()], rtol=1e-6)


def test_group_limited_routing_picks_only_from_the_best_groups():
    """Expert 0 scores highest, but its group's top-2 sum is the lowest: with a selection
    bias (DeepSeek-V3) it is masked out; without one a group scores its best expert
    (DeepSeek-V2), and expert 0's group is kept."""
    cfg = MoEConfig(num_experts=6, experts_per_token=2, router="sigmoid", n_group=3, topk_group=2)
    logits = jnp.array([[5.0, -5.0, 1.0, 1.0, 0.5, 0.6]])
    masked = router.group_limited(jax.nn.sigmoid(logits), 3, 2, biased=True)
    assert np.isneginf(masked[0, :2]).all() and np.isfinite(masked[0, 2:]).all()
    _, experts, _ = router.route(logits, jnp.zeros(6), cfg)
    np.testing.assert_array_equal(experts, [[2, 3]])
    masked = router.group_limited(jax.nn.sigmoid(logits), 3, 2, biased=False)
    assert np.isneginf(masked[0, 4:]).all() and np.isfinite(masked[0, :4]).all()
    softmax = dataclasses.replace(cfg, router="softmax")
    _, experts, _ = router.route(logits, None, softmax)
    np.testing.assert_array_equal(experts, [[0, 2]])


def test_bias_update_moves_each_expert_by_the_sign_of_its_load_gap():
    bias = jnp.array([[0.5, 0.0, -0.2, 0.1], [0.0, 0.0, 0.0, 0.0]])
    load = jnp.array([[10.0, 2.0, 6.0, 6.0], [1.0, 1.0, 1.0, 5.0]])  # means 6 and 2
    got = jax.jit(router.bias_update, static_argnums=2)(bias, load, 0.001)
    want = np.array([[0.499, 0.001, -0.2, 0.1], [0.001, 0.001, 0.001, -0.001]])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


def test_balance_and_z_losses_match_their_formulas():
    experts = jnp.array([[[0, 1], [0, 2]], [[0, 1], [1, 3]]])  # [B=2, T=2, K=2], E=4
    scores = jax.random.uniform(jax.random.key(0), (2, 2, 4))
    affinity = scores / scores.sum(-1, keepdims=True)
    counts = np.array([[2, 1, 1, 0], [1, 2, 0, 1]], np.float32)
    # Switch over the batch: E * sum_i f_i P_i, f the share of all 8 choices.
    switch = 4 * np.sum(counts.sum(0) / 8 * affinity.mean((0, 1)))
    batch_loss = router.balance_loss(experts.reshape(4, 2), scores.reshape(4, 4))
    np.testing.assert_allclose(batch_loss, switch, rtol=1e-6)
    # DeepSeek-V3 sequence-wise: f_i = E/(K T) * count_i per sequence, averaged over sequences.
    seq = np.mean([np.sum(4 / (2 * 2) * counts[b] * affinity[b].mean(0)) for b in range(2)])
    np.testing.assert_allclose(router.balance_loss(experts, scores), seq, rtol=1e-6)
    logits = jax.random.normal(jax.random.key(1), (3, 5, 4))
    z = np.mean(np.log(np.exp(np.asarray(logits)).sum(-1)) ** 2)
    np.testing.assert_allclose(router.router_z_loss(logits), z, rtol=1e-5)


def expert_kernels(num_experts=4, embed=8, hidden=6):
    wi = jax.random.normal(jax.random.key(10), (num_experts, embed, 2, hidden)) * 0.3
    wo = jax.random.normal(jax.random.key(11), (num_experts, hidden, embed)) * 0.3
    return wi, wo


@pytest.mark.parametrize("routing", ["random", "all_to_one_expert"])
def test_the_grouped_matmul_kernels_agree_on_values_and_gradients(routing):
    """block_sparse's worst case is every choice on one expert: the most padding blocks;
    tiled's, the most whole tiles."""
    wi, wo = expert_kernels()
    x = jax.random.normal(jax.random.key(0), (12, 8))
    weights = jax.random.uniform(jax.random.key(1), (12, 2))
    experts = jax.random.randint(jax.random.key(2), (12, 2), 0, 4)
    if routing == "all_to_one_expert":
        experts = jnp.stack([jnp.full(12, 3), jnp.where(jnp.arange(12) < 11, 3, 0)], axis=1)

    def run(kernel, capacity):
        def loss(x, weights, wi, wo):
            y, _ = routed_experts(x, weights, experts, wi, wo, capacity=capacity, kernel=kernel)
            return jnp.sum(jnp.sin(y))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, weights, wi, wo)

    for capacity in (12, 3):  # dropless, and dropping
        want = run("ragged_dot", capacity)
        for kernel in ("block_sparse", "tiled", "sorted_einsum"):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         run(kernel, capacity), want)


@pytest.mark.parametrize("kernel", ["ragged_dot", "block_sparse", "sorted_einsum"])
def test_capacity_drops_the_choices_past_each_experts_slots(kernel):
    """Six tokens all choose expert 0 first; tokens 0-2 also choose expert 1, tokens 3-5
    expert 2. With 2 slots per expert, expert 0 keeps tokens 0 and 1 and expert 1 tokens
    0 and 1; expert 2 keeps tokens 3 and 4. Six of the twelve choices drop."""
    wi, wo = expert_kernels()
    x = jax.random.normal(jax.random.key(0), (6, 8))
    experts = jnp.array([[0, 1]] * 3 + [[0, 2]] * 3)
    weights = jnp.full((6, 2), 0.5)
    fn = jax.jit(routed_experts, static_argnames=("capacity", "kernel"))
    y, dropped = fn(x, weights, experts, wi, wo, capacity=2, kernel=kernel)
    assert float(dropped) == 0.5
    kept = np.array([[1, 1], [1, 1], [0, 0], [0, 1], [0, 1], [0, 0]], np.float32)
    want = 0.0
    for k in range(2):
        outputs = [swiglu(x[t : t + 1], wi[e], wo[e])[0] for t, e in enumerate(experts[:, k])]
        want = want + 0.5 * kept[:, k : k + 1] * jnp.stack(outputs)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    big, none_dropped = fn(x, weights, experts, wi, wo, capacity=6, kernel=kernel)
    dropless, _ = fn(x, weights, experts, wi, wo, capacity=6, kernel="ragged_dot")
    assert float(none_dropped) == 0.0
    np.testing.assert_allclose(big, dropless, rtol=1e-6, atol=1e-6)


def test_capacity_dispatch_with_room_for_every_token_equals_dropless():
    cfg = ROUTINGS["softmax_top2"]
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    variables = init_moe(cfg, x)
    roomy = dataclasses.replace(
        cfg, dispatch="capacity", capacity_factor=4.0, kernel="sorted_einsum"
    )
    want = jax.jit(MoE(cfg).apply)(variables, x)
    apply = jax.jit(lambda v, x: MoE(roomy).apply(v, x, mutable=["moe_metrics"]))
    got, metrics = apply(variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(metrics["moe_metrics"]["dropped_fraction"]) == 0.0
    assert float(metrics["moe_metrics"]["tokens_per_expert"].sum()) == 32


def test_moe_config_overrides_and_validation_name_the_field():
    config = config_lib.apply_overrides(
        Config(), ["model.moe.num_experts=16", "model.moe.router=sigmoid"]
    )
    assert config.model.moe == MoEConfig(num_experts=16, router="sigmoid")
    for override, field in [
        ("model.moe.experts_per_token=9", "model.moe.experts_per_token"),
        ("model.moe.n_group=3", "model.moe.n_group"),
        ("model.moe.topk_group=2", "model.moe.topk_group"),
        ("model.moe.moe_every=3", "model.moe.moe_every"),
        ("model.moe.bias_update_rate=0.001", "model.moe.bias_update_rate"),
    ]:
        with pytest.raises(ConfigError, match=f"^{field}"):
            config_lib.apply_overrides(Config(), [override])


def test_the_kernel_names_are_the_configs_and_others_are_refused():
    assert typing.get_args(typing.get_type_hints(MoEConfig)["kernel"]) == KERNELS
    wi, wo = expert_kernels()
    x, weights, experts = jnp.zeros((4, 8)), jnp.ones((4, 1)), jnp.zeros((4, 1), jnp.int32)
    with pytest.raises(ValueError, match="^unknown experts kernel 'megablocks'"):
        routed_experts(x, weights, experts, wi, wo, capacity=4, kernel="megablocks")


def test_llama4_weights_the_experts_input_as_transformers_does():
    """`weight_inputs`: a top-1 sigmoid MoE with a shared expert equals transformers'
    Llama4TextMoe with the same weights, FFN_i(g h) + FFN_shared(h)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    embed, experts, width = 16, 4, 8
    cfg = MoEConfig(num_experts=experts, experts_per_token=1, expert_dim=width,
                    num_shared_experts=1, router="sigmoid", norm_topk_prob=False,
                    weight_inputs=True, kernel="ragged_dot")
    x = jax.random.normal(jax.random.key(0), (1, 6, embed))
    variables = nn.meta.unbox(MoE(cfg).init(jax.random.key(1), x))
    variables.pop("moe_metrics", None)
    params = jax.tree.map(lambda a: 3.0 * a, variables["params"])  # far from linear
    ours = MoE(cfg).apply({**variables, "params": params}, x)
    hf = Llama4TextMoe(transformers.Llama4TextConfig(
        hidden_size=embed, intermediate_size=width, num_local_experts=experts,
        num_experts_per_tok=1, intermediate_size_mlp=width, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8)).eval()
    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), params)
    with torch.no_grad():
        hf.router.weight.copy_(p["router"]["kernel"].T)
        hf.experts.gate_up_proj.copy_(p["wi"].reshape(experts, embed, 2 * width))
        hf.experts.down_proj.copy_(p["wo"])
        shared = p["shared"]
        hf.shared_expert.gate_proj.weight.copy_(shared["wi"]["kernel"][:, 0].T)
        hf.shared_expert.up_proj.weight.copy_(shared["wi"]["kernel"][:, 1].T)
        hf.shared_expert.down_proj.weight.copy_(shared["wo"]["kernel"].T)
        theirs, _ = hf(torch.tensor(np.asarray(x)))
    np.testing.assert_allclose(ours.reshape(-1, embed), theirs.numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="weight_inputs: .*experts_per_token=1"):
        dataclasses.replace(cfg, experts_per_token=2).validate("model.moe.")
