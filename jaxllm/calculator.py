"""Parameters, FLOPs, KV cache and memory per device, read off the model code itself.

Every shape comes from `jax.eval_shape` of the model's own `init` (nothing is allocated),
and every per-device figure from the sharding rules of `jaxllm.parallel` applied to those
shapes on an abstract mesh, so no second formula can drift from the model.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from jaxllm import config as config_lib
from jaxllm import fp8_costs, parallel, presets
from jaxllm.compile.topology import GENERATIONS
from jaxllm.nn import lora
from jaxllm.nn.attention_kernels import resolve_kernel
from jaxllm.nn.masks import Mask
from jaxllm.nn.transformer import Transformer, layer_kinds
from jaxllm.train import flops
from jaxllm.train.optimizer import make_optimizer, split_trainable

# The HBM per chip the preset table fits against.
HBM_BYTES = {name: GENERATIONS[name].hbm_bytes for name in ("v5e", "v5p")}

TOKENS_PER_PARAM = 20  # Chinchilla (Hoffmann et al. 2022): compute-optimal D ~= 20 N


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes on one device. `activations` and `gathered` are estimates (`activation_bytes`,
    `gathered_layer_bytes`)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    gathered: int = 0  # the largest layer's FSDP-gathered weights and gradients (estimate)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.gathered


@dataclasses.dataclass(frozen=True)
class Report:
    """The calculator's figures for one config on one mesh."""

    params: dict[str, int]  # category -> parameters
    active: dict[str, int]  # category -> parameters a token uses
    total_params: int
    active_params: int
    train_flops_per_token: float  # PaLM convention, `jaxllm.train.flops`, at train.seq_len
    kv_cache_bytes_per_token: int
    context_len: int
    kv_cache_bytes: int  # one sequence of context_len tokens
    mesh: dict[str, int]
    memory: Memory
    chinchilla_tokens: int  # 20 x total parameters
    chinchilla_flops: float  # 6 x active parameters x chinchilla_tokens
    fp8: fp8_costs.Fp8Estimate | None = None  # model.fp8's effect (estimate); None without


def _model_init_shapes(cfg: config_lib.ModelConfig, decode: bool = False, length: int = 8):
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.eval_shape(Transformer(cfg, decode=decode).init, jax.random.key(0), tokens)


def boxed_params(cfg: config_lib.ModelConfig):
    """The model's parameters as `nn.Partitioned` boxes of `ShapeDtypeStruct`s."""
    return _model_init_shapes(cfg)["params"]


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


CATEGORIES = ("embedding", "vision", "attention", "ssm", "dense_ffn", "experts",
              "shared_experts", "router", "norms", "head", "adapters")


def _category(path: tuple[str, ...]) -> str:
    """Which part of the model a parameter at `path` belongs to."""
    if path[0] in ("embedding", "head"):
        return path[0]
    if path[0] == "patch_embed":
        return "vision"
    if path[-1] == "scale":
        return "norms"
    if lora.SCOPE in path[:-1]:
        return "adapters"
    for key, category in (("router", "router"), ("shared", "shared_experts"), ("moe", "experts"),
                          ("mlp", "dense_ffn"), ("attn", "attention"), ("ssm", "ssm")):
        if key in path:
            return category
    raise ValueError(f"parameter {'/'.join(path)}: no calculator category; add one")


def param_counts(cfg: config_lib.ModelConfig) -> tuple[dict[str, int], dict[str, int]]:
    """(total, active) parameters by category. A routed-expert tensor (one with an `expert`
    axis) is active for experts_per_token of its num_experts experts."""
    total: dict[str, int] = {}
    active: dict[str, int] = {}
    leaves = jax.tree_util.tree_flatten_with_path(boxed_params(cfg), is_leaf=_is_box)[0]
    for keys, box in leaves:
        category = _category(tuple(k.key for k in keys))
        size = math.prod(box.value.shape)
        used = size
        if "expert" in box.names:
            used = size * cfg.moe.experts_per_token // cfg.moe.num_experts
        total[category] = total.get(category, 0) + size
        active[category] = active.get(category, 0) + used
    order = [c for c in CATEGORIES if c in total]
    return {c: total[c] for c in order}, {c: active[c] for c in order}


def kv_cache_bytes(cfg: config_lib.ModelConfig, context_len: int) -> int:
    """Bytes of the decoding model's "cache" collection for one sequence of `context_len`
    tokens (all layers): a sliding-window layer's ring stays `window` slots long."""
    cache = _model_init_shapes(cfg, decode=True, length=context_len)["cache"]
    leaves = jax.tree_util.tree_flatten_with_path(cache)[0]
    return sum(
        x.size * x.dtype.itemsize for keys, x in leaves if keys[-1].key != "cache_index"
    )


def kv_cache_bytes_per_token(cfg: config_lib.ModelConfig) -> int:
    """Bytes the cache grows by per cached token (all layers; sliding rings do not grow)."""
    return kv_cache_bytes(cfg, 2) - kv_cache_bytes(cfg, 1)


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    """A mesh of the given axis sizes without devices: enough to compute shard shapes."""
    return AbstractMesh(tuple(sizes[a] for a in parallel.MESH_AXES), parallel.MESH_AXES)


def device_bytes(boxed_tree, mesh) -> int:
    """Bytes of one device's shards of a tree of boxed (or plain) shapes, sharded by RULES.

    Every device holds the same shard shape, since a dimension the mesh axes do not divide
    stays replicated."""
    specs = parallel.shardings(boxed_tree, mesh)
    shapes = nn.meta.unbox(boxed_tree)
    return sum(
        math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for s, x in zip(jax.tree.leaves(specs), jax.tree.leaves(shapes))
    )


def activation_bytes(config: config_lib.Config, mesh: dict[str, int]) -> int:
    """An estimate of the activations one device keeps for the backward pass.

    With b = train.batch_size / grad_accum / (data * fsdp) rows of s = seq_len / context
    tokens per device, t = tensor, S = seq_len, d, H heads, K kv heads, dh head_dim,
    V vocab and F the FFN width of a layer (mlp_dim, or top-k x expert_dim + shared width
    + num_experts router logits for a MoE layer), the values one layer makes per token are

        all(F) = 4d + (2H + 2K) dh / t + 2 H S / t + 3 F / t

    (norm inputs and outputs; q, k, v and attention output; scores and probabilities; gate,
    up and their product). The scores term counts only in layers whose attention kernel, as
    `auto` resolves it on TPU, materialises them (naive); flash-style kernels (splash,
    blockwise) keep O(block) of them. The stack keeps, per token, in the compute dtype:

        remat none:      sum over layers of all(F)
        remat save_dots: sum over layers of saved(F) = 3d + (H + 2K) dh / t + 2F / t
                         (matmul outputs) + max (all(F) - saved(F))   (the rest of the
                         layer being recomputed)
        remat full:      L d   (each layer's input) + max all(F)

    plus the logits, V / t per token in the compute dtype (the loss's float32 work fuses with
    them: `jaxllm.train.step.cross_entropy`).
    """
    m, t = config.model, config.train
    rows = t.batch_size // t.grad_accum // (mesh[parallel.DATA] * mesh[parallel.FSDP])
    tokens = rows * (t.seq_len // mesh[parallel.CONTEXT])
    tp, d, dh = mesh[parallel.TENSOR], m.embed_dim, m.resolved_head_dim
    H, K = m.num_heads, m.num_kv_heads  # noqa: N806 (the docstring's names)

    def ffn(use_moe: bool) -> int:
        if not use_moe:
            return m.mlp_dim
        moe = m.moe
        return moe.experts_per_token * moe.expert_dim + moe.resolved_shared_dim + moe.num_experts

    kinds = layer_kinds(m)
    widths = [ffn(kind.moe) for kind in kinds]
    scores = [2 * H * t.seq_len if _materialises_scores(m.attention, kind) else 0 for kind in kinds]
    all_values = [4 * d + ((2 * H + 2 * K) * dh + s + 3 * f) / tp for f, s in zip(widths, scores)]
    if m.remat == "none":
        kept = sum(all_values)
    elif m.remat == "save_dots":
        saved = [3 * d + ((H + 2 * K) * dh + 2 * f) / tp for f in widths]
        kept = sum(saved) + max(a - b for a, b in zip(all_values, saved))
    else:
        kept = m.num_layers * d + max(all_values)
    itemsize = jnp.dtype(m.dtype).itemsize
    return int(tokens * (kept + m.vocab_size / tp) * itemsize)


def _materialises_scores(attention: config_lib.AttentionConfig, kind) -> bool:
    """Whether a layer of `kind` computes its whole score matrix on TPU (an SSM layer has
    none)."""
    if kind.attention == "ssm":
        return False
    mask = Mask(kind.attention, attention.window, attention.chunk, attention.stride)
    kernel = resolve_kernel(attention.kernel, mask, alibi=kind.position == "alibi",
                            platform="tpu")
    return kernel in ("naive", "backend", "cudnn")  # cudnn runs XLA off GPU


def gathered_layer_bytes(config: config_lib.Config, mesh: dict[str, int]) -> int:
    """An estimate of the largest layer's weights as FSDP gathers them for its compute (split
    only over tensor, and routed experts over expert), in the compute dtype, plus their
    float32 gradients before the reduce-scatter."""
    m = config.model
    total, _ = param_counts(m)
    ssm_layers = sum(m.attention.layer(i)[0] == "ssm" for i in range(m.num_layers))
    attention = 2 * m.embed_dim + max(  # a layer has attention or an SSM
        total.get("attention", 0) / max(1, m.num_layers - ssm_layers),
        total.get("ssm", 0) / max(1, ssm_layers))
    num_moe = sum(m.moe_layers())
    layer = attention + total.get("dense_ffn", 0) / max(1, m.num_layers - num_moe)
    if num_moe:
        routed = total["experts"] / num_moe / mesh[parallel.EXPERT]
        shared = (total.get("shared_experts", 0) + total.get("router", 0)) / num_moe
        layer = max(layer, attention + routed + shared)
    itemsize = jnp.dtype(m.dtype).itemsize + 4
    return int(layer / mesh[parallel.TENSOR] * itemsize)


def memory(config: config_lib.Config, mesh: dict[str, int]) -> Memory:
    """Per-device bytes of params, grads (the trainable params' layout and dtype: with LoRA,
    the adapters'), the optimizer state of `make_optimizer` (AdamW: two float32 moments of
    each trainable param), activations, and the largest layer's gathered weights and
    gradients (`gathered_layer_bytes`)."""
    abstract = abstract_mesh(mesh)
    params = boxed_params(config.model)
    trainable, _ = split_trainable(params, config.model)
    opt_state = jax.eval_shape(make_optimizer(config.train).init, trainable)
    return Memory(
        params=device_bytes(params, abstract),
        grads=device_bytes(trainable, abstract),
        optimizer=device_bytes(opt_state, abstract),
        activations=activation_bytes(config, mesh),
        gathered=gathered_layer_bytes(config, mesh),
    )


def calculate(config: config_lib.Config, devices: int, context_len: int | None = None) -> Report:
    """The figures for `config` trained on `devices` devices (the mesh's -1 axis resolved),
    with the KV cache sized for `context_len` tokens (default: train.seq_len)."""
    mesh = parallel.validate_for_devices(config, devices)
    total, active = param_counts(config.model)
    n_total, n_active = sum(total.values()), sum(active.values())
    per_token = kv_cache_bytes_per_token(config.model)
    context_len = context_len or config.train.seq_len
    tokens = TOKENS_PER_PARAM * n_total
    per_token_flops = flops.train_flops_per_token(config.model, n_total, config.train.seq_len)
    return Report(
        params=total,
        active=active,
        total_params=n_total,
        active_params=n_active,
        train_flops_per_token=float(per_token_flops),
        kv_cache_bytes_per_token=per_token,
        context_len=context_len,
        kv_cache_bytes=kv_cache_bytes(config.model, context_len),
        mesh=mesh,
        memory=memory(config, mesh),
        chinchilla_tokens=tokens,
        chinchilla_flops=6.0 * n_active * tokens,
        fp8=fp8_costs.estimate(config.model, total, active, per_token_flops),
    )


def compute_optimal(budget_flops: float) -> dict[str, float]:
    """Chinchilla's compute-optimal model for a FLOP budget C: C = 6 N D with D = 20 N,
    so N = sqrt(C / 120) parameters trained on D tokens."""
    if budget_flops <= 0:
        raise ValueError(f"budget_flops: must be positive, got {budget_flops}")
    params = math.sqrt(budget_flops / (6 * TOKENS_PER_PARAM))
    return {"flops": budget_flops, "params": params, "tokens": TOKENS_PER_PARAM * params}


def suggested_config(model: config_lib.ModelConfig, chips: int = 256) -> config_lib.Config:
    """A training config for `model` on `chips` chips: FSDP over all of them, or for MoE
    `expert` = the largest power of two up to 16 dividing the experts and FSDP over the
    rest; one 4096-token sequence per batch shard (data x fsdp), full remat, bfloat16."""
    expert = 1
    if model.moe is not None:
        expert = math.gcd(model.moe.num_experts, chips, 16)
    model = dataclasses.replace(model, remat="full", dtype="bfloat16")
    return config_lib.Config(
        model=model,
        mesh=config_lib.MeshConfig(data=1, fsdp=chips // expert, expert=expert),
        train=config_lib.TrainConfig(batch_size=chips // expert, seq_len=4096),
    )


def preset_rows(names: list[str], chips: int = 256) -> list[dict]:
    """Per preset: total and active parameters, training FLOPs per token, KV-cache bytes
    per token, the suggested mesh and GiB per chip, and whether that fits each chip's HBM."""
    rows = []
    for name in names:
        config = suggested_config(presets.PRESETS[name](), chips)
        report = calculate(config, chips)
        row = {
            "preset": name,
            "total": report.total_params,
            "active": report.active_params,
            "flops_per_token": report.train_flops_per_token,
            "kv_bytes_per_token": report.kv_cache_bytes_per_token,
            "mesh": f"fsdp={report.mesh['fsdp']}, expert={report.mesh['expert']}",
            "gib_per_chip": report.memory.total / 2**30,
        }
        for chip, hbm in HBM_BYTES.items():
            row[f"fits_{chip}"] = report.memory.total <= hbm
        rows.append(row)
    return rows


def format_presets(rows: list[dict], chips: int = 256) -> str:
    """`preset_rows` as a markdown table."""
    chips_cols = [f"{chip}-{chips}" for chip in HBM_BYTES]
    header = ["preset", "total", "active", "train FLOPs/token", "KV cache/token", "mesh",
              "GiB/chip", *chips_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        fits = ["yes" if r[f"fits_{chip}"] else "no" for chip in HBM_BYTES]
        cells = [r["preset"], _si(r["total"]), _si(r["active"]), _si(r["flops_per_token"]),
                 _bytes(r["kv_bytes_per_token"]), r["mesh"], f"{r['gib_per_chip']:.1f}", *fits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Tables


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _bytes(value: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"


def format_report(report: Report) -> str:
    """The report as an aligned two-column table."""
    rows = [("parameters", "total / active")]
    for category, count in report.params.items():
        rows.append((f"  {category}", f"{count:,} / {report.active[category]:,}"))
    mem = report.memory
    rows += [
        ("  all", f"{report.total_params:,} ({_si(report.total_params)}) / "
                  f"{report.active_params:,} ({_si(report.active_params)})"),
        ("train FLOPs / token", f"{report.train_flops_per_token:.4g}"),
        ("KV cache / token", f"{report.kv_cache_bytes_per_token:,} B"),
        (f"KV cache / {report.context_len} tokens", _bytes(report.kv_cache_bytes)),
        ("mesh", " ".join(f"{k}={v}" for k, v in report.mesh.items())),
        ("per device: params", _bytes(mem.params)),
        ("  grads", _bytes(mem.grads)),
        ("  optimizer", _bytes(mem.optimizer)),
        ("  activations (est.)", _bytes(mem.activations)),
        ("  gathered layer (est.)", _bytes(mem.gathered)),
        ("  total", _bytes(mem.total)),
        ("Chinchilla tokens (20 N)", _si(report.chinchilla_tokens)),
        ("Chinchilla compute (6 N D)", f"{report.chinchilla_flops:.3g} FLOPs"),
    ]
    if report.fp8:
        rows.append(("fp8 (est.)", fp8_costs.describe(report.fp8)))
    return _table(rows)


def format_plan(plan: dict[str, float]) -> str:
    """The compute-optimal plan as a table."""
    return _table([
        ("budget", f"{plan['flops']:.3g} FLOPs"),
        ("compute-optimal params", _si(plan["params"])),
        ("compute-optimal tokens", _si(plan["tokens"])),
    ])


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def to_json(report: Report) -> dict:
    """A JSON-ready dict of the report, with the memory total."""
    out = dataclasses.asdict(report)
    out["memory"]["total"] = report.memory.total
    return out

