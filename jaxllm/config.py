"""Configs as frozen dataclasses: validation, `key.sub=value` overrides, experiment files.

A `Config` is plain, hashable data. Every check that can fail runs before anything is
compiled, and every error names the field at fault and says how to fix it. Each section
checks its own fields (`validate(prefix)`, where `prefix` is its path, e.g. "model.moe.");
`validate` runs them all, then the checks that span sections.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from etils import epath

from jaxllm.tools.builtin import BUILTINS


class ConfigError(ValueError):
    """A config field holds a value that cannot work. The message names the field."""


# The effort levels a prompt can name with a control token `<effort:LEVEL>`.
EFFORT_LEVELS = ("instant", "low", "medium", "high")


def split_list(text: str) -> tuple[str, ...]:
    """"a, b,c" -> ("a", "b", "c"); "" -> ()."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def _require_positive(section: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value > 0, f"{prefix}{name}", f"must be positive, got {value}")


def _require_choice(section: Any, prefix: str, name: str) -> None:
    """The field `name`, a Literal, holds one of its choices."""
    choices = typing.get_args(typing.get_type_hints(type(section))[name])
    value = getattr(section, name)
    _require(value in choices, f"{prefix}{name}", f"must be one of {list(choices)}, got {value!r}")


def _require_non_negative(section: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value >= 0, f"{prefix}{name}", f"must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts feed-forward layer and where it goes in the stack.

    The routing conventions (softmax or sigmoid scores, group-limited selection, the
    selection-only bias) follow `docs/references.md`, "Mixture of experts".
    """

    num_experts: int = 8
    experts_per_token: int = 2  # top-k
    expert_dim: int = 128  # hidden width of each routed SwiGLU expert
    num_shared_experts: int = 0  # always-on experts, fused into one SwiGLU
    shared_expert_dim: int | None = None  # None: expert_dim
    router: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True  # divide the top-k weights by their sum
    routed_scaling_factor: float = 1.0
    # Llama 4: a token enters its one expert scaled by the router weight, FFN_i(g_i h),
    # instead of scaling the expert's output, g_i FFN_i(h).
    weight_inputs: bool = False
    n_group: int = 1  # group-limited routing (DeepSeek-V3): experts split into n_group groups
    topk_group: int = 1  # ... of which only the best topk_group are eligible
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25  # dispatch=capacity: slots per expert = factor * T * k / E
    # The grouped matmul (`jaxllm.nn.experts`): auto picks by target platform: gmm (the Pallas
    # megablox kernel, `jaxllm.nn.gmm_experts`; a compile proof, not measured) on TPU, and from
    # benchmarks/moe.py block_sparse on GPU, tiled elsewhere (CPU). triton_gmm: block_sparse's
    # blocks through a Pallas Triton grouped matmul (`jaxllm.nn.triton_experts`), and
    # mosaic_gmm: jax's Mosaic GPU ragged dot for Hopper (`jaxllm.nn.mosaic_experts`); both
    # untimed, so auto never picks them. sorted_einsum: padded [E, C, D] blocks (with
    # dispatch=capacity; dropless holds C = T rows, E/k times the FLOPs).
    kernel: Literal["auto", "ragged_dot", "gmm", "triton_gmm", "mosaic_gmm", "block_sparse",
                    "tiled", "sorted_einsum"] = "auto"
    # On a mesh with expert > 1 whose devices split the tokens: shard_map with an all_to_all
    # token exchange (`jaxllm.nn.expert_parallel`). False, or tokens that do not split,
    # leave the expert-sharded matmuls to GSPMD.
    expert_parallel: bool = True
    load_balance_loss: float = 0.0  # weight of the Switch load-balance loss
    seq_aux_loss: float = 0.0  # weight of the DeepSeek-V3 sequence-wise auxiliary loss
    router_z_loss: float = 0.0  # weight of the ST-MoE router z-loss
    bias_update_rate: float = 0.0  # gamma of aux-loss-free balancing (sigmoid router)
    first_dense_layers: int = 0  # the first layers keep a dense SwiGLU (DeepSeek)
    moe_every: int = 1  # then every moe_every-th layer is MoE (Llama 4 Maverick: 2)

    @property
    def resolved_shared_dim(self) -> int:
        return self.num_shared_experts * (self.shared_expert_dim or self.expert_dim)

    def validate(self, prefix: str) -> None:
        """Checks the fields; the placement in the stack is `ModelConfig`'s to check."""
        _require_positive(self, prefix, ("num_experts", "experts_per_token", "expert_dim",
                                         "n_group", "topk_group", "moe_every", "capacity_factor"))
        self._validate_groups(prefix)
        _require(self.num_shared_experts >= 0, f"{prefix}num_shared_experts", "must be >= 0")
        _require(
            self.shared_expert_dim is None or self.shared_expert_dim > 0,
            f"{prefix}shared_expert_dim",
            "must be positive or None",
        )
        for name in ("load_balance_loss", "seq_aux_loss", "router_z_loss", "bias_update_rate"):
            _require(getattr(self, name) >= 0, f"{prefix}{name}", "must be >= 0")
        _require(not self.weight_inputs or self.experts_per_token == 1,
                 f"{prefix}weight_inputs", "scales the input of a token's one expert; set "
                 f"{prefix}experts_per_token=1")
        _require(
            self.bias_update_rate == 0 or self.router == "sigmoid",
            f"{prefix}bias_update_rate",
            f"the selection bias belongs to the sigmoid router; set {prefix}router=sigmoid",
        )

    def _validate_groups(self, prefix: str) -> None:
        """Top-k selection, and group-limited routing, can pick enough experts."""
        _require(
            self.experts_per_token <= self.num_experts,
            f"{prefix}experts_per_token",
            f"{self.experts_per_token} exceeds {prefix}num_experts={self.num_experts}",
        )
        _require(
            self.num_experts % self.n_group == 0,
            f"{prefix}n_group",
            f"{self.n_group} groups do not divide {prefix}num_experts={self.num_experts}",
        )
        _require(
            self.n_group == 1 or self.num_experts // self.n_group >= 2,
            f"{prefix}n_group",
            "a group is scored by its top-2 experts, so each group needs at least 2",
        )
        _require(
            self.topk_group <= self.n_group,
            f"{prefix}topk_group",
            f"{self.topk_group} exceeds {prefix}n_group={self.n_group}",
        )
        _require(
            self.experts_per_token <= self.topk_group * (self.num_experts // self.n_group),
            f"{prefix}topk_group",
            f"{self.topk_group} groups hold fewer than experts_per_token={self.experts_per_token}"
            " experts",
        )


ATTENTION_KINDS = ("global", "sliding", "chunked", "strided", "sparse", "ssm")
POSITION_KINDS = ("rope", "alibi", "none")
# The layers each whole-row attention kernel runs: the kernels (nn/splash.py,
# nn/gpu_attention.py) and the config check read this one table.
ROW_KERNEL_LAYERS = {"splash": ("global", "sliding", "chunked"), "cudnn": ("global", "sliding"),
                     "pallas_gpu": ("global",)}
# The smallest tile of the mosaic_gmm experts kernel (nn/mosaic_experts.py), which the model
# and expert widths must be multiples of.
MOSAIC_GMM_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2/V3): K and V come from a shared latent.

    The KV cache holds only the kv_lora_rank latent and the qk_rope_head_dim rotary key per
    token. `docs/references.md`, "Multi-head Latent Attention".
    """

    q_lora_rank: int | None = None  # None: queries straight from the hidden state
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    absorb: bool = True  # decode with W_uk folded into the query and W_uv into the output

    def validate(self, prefix: str) -> None:
        """Checks the fields; how MLA fits the rest of attention is checked by its parents."""
        _require_positive(self, prefix, ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                         "v_head_dim"))
        _require(self.q_lora_rank is None or self.q_lora_rank > 0, f"{prefix}q_lora_rank",
                 "must be positive or None")
        _require(self.qk_rope_head_dim % 2 == 0, f"{prefix}qk_rope_head_dim",
                 "RoPE needs an even dimension")


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """DeepSeek Sparse Attention (V3.2): a lightning indexer picks `top_k` keys per query.

    stage "dense": attention stays dense and only the indexer learns (the warm-up);
    "sparse": each query attends to its top-k keys. The indexer's KL loss, times
    `loss_weight`, joins the training loss; its input is detached from the LM loss.
    Training and prefill attend `query_block` queries at a time, so memory grows with
    query_block x sequence, not sequence squared.
    """

    top_k: int = 64
    indexer_heads: int = 4
    indexer_head_dim: int = 32
    stage: Literal["dense", "sparse"] = "sparse"
    loss_weight: float = 1.0
    query_block: int = 256

    def validate(self, prefix: str) -> None:
        """Checks the fields."""
        _require_positive(self, prefix,
                          ("top_k", "indexer_heads", "indexer_head_dim", "query_block"))
        _require(self.loss_weight >= 0, f"{prefix}loss_weight", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class SSMConfig:
    """The Mamba-2 SSD layer (Dao & Gu 2024, arXiv 2405.21060) of the `ssm` entries of an
    attention pattern: `num_heads` heads of width `head_dim`, each with a scalar decay, over
    a `state_dim` state shared input B and output C; a causal depthwise conv of
    `conv_width`; a gated RMSNorm before the output projection. `docs/hybrid.md`.
    """

    num_heads: int = 8
    head_dim: int = 32  # P: the inner width is num_heads * head_dim (Mamba-2: 2 x embed_dim)
    state_dim: int = 64  # N: the state of each head is [head_dim, state_dim]
    conv_width: int = 4  # taps of the causal conv over x, B and C
    chunk: int = 64  # tokens per chunk of the parallel (training and prefill) form
    dt_min: float = 0.001  # the step sizes dt start log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1

    def validate(self, prefix: str) -> None:
        """Checks the fields."""
        _require_positive(self, prefix, ("num_heads", "head_dim", "state_dim", "chunk",
                                         "dt_min"))
        _require(self.conv_width >= 2, f"{prefix}conv_width",
                 f"the conv needs at least 2 taps, got {self.conv_width}")
        _require(self.dt_max >= self.dt_min, f"{prefix}dt_max",
                 f"must be >= dt_min={self.dt_min}, got {self.dt_max}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """How each layer attends. `pattern` and `positions` are comma-separated lists that
    cycle over the layers: layer i uses entry i mod len.

    pattern entries: global (causal), sliding (the last `window` keys), chunked (Llama 4:
    causal within blocks of `chunk` tokens), strided (the last `window` keys plus every
    `stride`-th key), sparse (DeepSeek sparse attention, `sparse`), ssm (not attention: a
    Mamba-2 state-space layer, `ssm`; its positions entry is unused).
    positions entries: rope, alibi, none (NoPE). Llama 4: pattern
    "chunked,chunked,chunked,global" and positions "rope,rope,rope,none".
    """

    pattern: str = "global"
    positions: str = "rope"
    window: int = 64
    chunk: int = 128
    stride: int = 16
    # naive: the whole score matrix; blockwise: flash-style blocks, O(S * block_size) memory,
    # skipping the blocks a mask leaves empty; splash: the Pallas TPU flash kernel (global,
    # sliding and chunked layers without ALiBi; interpreted off TPU); cudnn: cuDNN's flash
    # attention through jax.nn.dot_product_attention (global and sliding layers without ALiBi,
    # bfloat16 or float16; packed documents as an S x S mask per row; XLA off GPU);
    # pallas_gpu: jax's Pallas GPU flash kernel (global layers without ALiBi, seq_len a
    # multiple of 16; interpreted off GPU); backend: jax.nn.dot_product_attention (XLA);
    # auto: per layer, splash on TPU where it runs the layer, else blockwise, and naive off
    # TPU (nn/attention_kernels.py resolve_kernel).
    kernel: Literal["naive", "blockwise", "splash", "cudnn", "pallas_gpu", "backend",
                    "auto"] = "auto"
    block_size: int = 128
    rope_scaling: Literal["none", "linear", "yarn", "llama3"] = "none"
    rope_factor: float = 1.0
    rope_original_len: int = 4096  # the pretraining context YaRN and llama3 extend
    rope_low_freq_factor: float = 1.0  # llama3 (Llama 3.1) scaling, see nn/positions.py
    rope_high_freq_factor: float = 4.0
    qk_norm: Literal["none", "rms", "l2"] = "none"  # per-head q/k norm (Qwen3: rms, Llama 4: l2)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    mla: MLAConfig | None = None
    sparse: SparseConfig | None = None
    ssm: SSMConfig | None = None

    def layer(self, index: int) -> tuple[str, str]:
        """(attention kind, position kind) of layer `index`."""
        kinds, positions = self.pattern.split(","), self.positions.split(",")
        return kinds[index % len(kinds)], positions[index % len(positions)]

    def validate(self, prefix: str) -> None:
        """Checks the fields and the `sparse` and `mla` sections; the kernel against the
        layers is `ModelConfig`'s to check."""
        for field, choices in (("pattern", ATTENTION_KINDS), ("positions", POSITION_KINDS)):
            text = getattr(self, field)
            for kind in text.split(","):
                _require(kind in choices, f"{prefix}{field}",
                         f"{kind!r} in {text!r} is not one of {list(choices)}")
        _require_positive(self, prefix, ("window", "chunk", "stride", "block_size",
                                         "rope_original_len"))
        _require(self.rope_factor >= 1, f"{prefix}rope_factor",
                 f"extends the context, so must be >= 1, got {self.rope_factor}")
        _require(self.rope_high_freq_factor > self.rope_low_freq_factor,
                 f"{prefix}rope_high_freq_factor",
                 f"must exceed rope_low_freq_factor={self.rope_low_freq_factor}")
        _require("sparse" not in self.pattern or self.sparse is not None, f"{prefix}sparse",
                 f"the pattern has sparse layers; set the indexer, e.g. {prefix}sparse.top_k=64")
        if self.sparse is not None:
            self.sparse.validate(f"{prefix}sparse.")
        _require("ssm" not in self.pattern.split(",") or self.ssm is not None, f"{prefix}ssm",
                 f"the pattern has ssm layers; set the section, e.g. {prefix}ssm.state_dim=64")
        if self.ssm is not None:
            self.ssm.validate(f"{prefix}ssm.")
        if self.mla is not None:
            self.mla.validate(f"{prefix}mla.")
            _require(self.qk_norm == "none", f"{prefix}qk_norm",
                     "MLA normalises its latents instead; set qk_norm=none")
            _require(not self.qkv_bias, f"{prefix}qkv_bias",
                     "MLA projections have no biases; set qkv_bias=false")


LORA_TARGETS = ("q", "k", "v", "o", "mlp")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, arXiv 2106.09685) on the projections `targets`
    names: W x + (alpha / rank) B(A x), B zero at init, and only A and B train.
    `docs/lora.md`.
    """

    rank: int = 8  # r of A [in, r] and B [r, out]; 0: off, as lora=None
    alpha: float = 16.0  # the update is scaled by alpha / rank
    # comma-separated projection groups: q, k, v, o (attention query, key, value, output),
    # mlp (both matmuls of the dense SwiGLU layers)
    targets: str = "q,k,v,o,mlp"

    @property
    def target_set(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.targets.split(","))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self, prefix: str) -> None:
        """Checks the fields; which layers the targets exist in is `ModelConfig`'s to check."""
        _require_non_negative(self, prefix, ("rank",))
        _require_positive(self, prefix, ("alpha",))
        names = [t.strip() for t in self.targets.split(",")]
        for name in names:
            _require(name in LORA_TARGETS, f"{prefix}targets",
                     f"{name!r} in {self.targets!r} is not one of {list(LORA_TARGETS)}")
        _require(len(names) == len(set(names)), f"{prefix}targets",
                 f"{self.targets!r} names a target twice")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Early-fusion images (`docs/multimodal.md`): each `<patch>` token of the input takes
    the linear embedding of one image patch in place of its token embedding."""

    image_size: int = 0  # pixels of the square images; 0: text only
    patch_size: int = 4  # pixels of a square patch's side
    channels: int = 3
    patch_token_id: int = 273  # the `<patch>` placeholder token

    @property
    def grid(self) -> int:
        """Patches along each side of an image."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: patch_size**2 * channels."""
        return self.patch_size**2 * self.channels

    def validate(self, prefix: str) -> None:
        """Checks the fields; the placeholder against the vocabulary is `ModelConfig`'s to
        check."""
        _require_positive(self, prefix, ("patch_size", "channels"))
        _require(self.image_size >= 0 and self.image_size % self.patch_size == 0,
                 f"{prefix}image_size",
                 f"must be 0 (text only) or a positive multiple of {prefix}patch_size="
                 f"{self.patch_size}, got {self.image_size}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer."""

    vocab_size: int = 512
    embed_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4  # == num_heads: MHA; 1: MQA; otherwise GQA.
    head_dim: int | None = None  # None: embed_dim // num_heads.
    mlp_dim: int = 384
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; params stay float32
    remat: Literal["none", "full", "save_dots"] = "none"
    scan_layers: bool = True
    # With mesh.context > 1: "ring" attention or the "all_gather" K/V baseline.
    context_parallel: Literal["ring", "all_gather"] = "ring"
    moe: MoEConfig | None = None  # None: every layer is a dense SwiGLU
    attention: AttentionConfig = AttentionConfig()
    # FP8 matmuls in the attention projections and the dense and expert SwiGLUs (docs/fp8.md):
    # tensorwise: a scale per tensor from its amax over the last fp8_history steps (Transformer
    # Engine); blockwise: DeepSeek-V3's 1 x fp8_block_size tiles and square weight blocks.
    fp8: Literal["none", "tensorwise", "blockwise"] = "none"
    fp8_block_size: int = 128
    fp8_history: int = 16
    lora: LoRAConfig | None = None  # low-rank adapters, the only weights that train; None: off
    vision: VisionConfig = VisionConfig()  # image patches as tokens; image_size=0: text only

    @property
    def active_lora(self) -> LoRAConfig | None:
        """`lora` when it adds adapters (rank > 0), else None."""
        return self.lora if self.lora is not None and self.lora.rank > 0 else None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    def moe_layers(self) -> tuple[bool, ...]:
        """Whether each layer's feed-forward is MoE: after `first_dense_layers` dense layers
        (DeepSeek-V3), the last of every `moe_every` layers (Llama 4 Maverick: 1, 3, 5, ...)."""
        if self.moe is None:
            return (False,) * self.num_layers
        first, every = self.moe.first_dense_layers, self.moe.moe_every
        return tuple(i >= first and (i - first + 1) % every == 0 for i in range(self.num_layers))

    def validate(self, prefix: str) -> None:
        """Checks the fields, the `moe` and `attention` sections, and how they fit the layers."""
        _require_positive(self, prefix, ("vocab_size", "embed_dim", "num_layers", "num_heads",
                                         "num_kv_heads", "mlp_dim"))
        self._validate_heads(prefix)
        if self.moe is not None:
            self.moe.validate(f"{prefix}moe.")
            self._validate_moe_placement(prefix)
            self._validate_moe_kernel(prefix)
        self.attention.validate(f"{prefix}attention.")
        self._validate_attention_layers(prefix)
        self._validate_fp8(prefix)
        if self.lora is not None:
            self.lora.validate(f"{prefix}lora.")
            self._validate_lora(prefix)
        self.vision.validate(f"{prefix}vision.")
        _require(not self.vision.image_size or 0 <= self.vision.patch_token_id < self.vocab_size,
                 f"{prefix}vision.patch_token_id",
                 f"must lie in [0, {prefix}vocab_size={self.vocab_size}), got "
                 f"{self.vision.patch_token_id}")

    def _validate_lora(self, prefix: str) -> None:
        """The targets exist in this model's layers."""
        targets = self.lora.target_set if self.active_lora else frozenset()
        _require(not targets - {"mlp"} or self.attention.mla is None, f"{prefix}lora.targets",
                 "MLA projections take no adapters; set the targets to mlp, or lora=none")
        _require("mlp" not in targets or not all(self.moe_layers()), f"{prefix}lora.targets",
                 "mlp adapts the dense SwiGLU layers, and every layer here is MoE; drop mlp")

    def _validate_heads(self, prefix: str) -> None:
        """The heads split the width (or `head_dim` is set) and the kv heads split the heads."""
        if self.head_dim is None:
            _require(
                self.embed_dim % self.num_heads == 0,
                f"{prefix}num_heads",
                f"{self.num_heads} heads do not divide {prefix}embed_dim={self.embed_dim}; "
                f"pick a divisor or set {prefix}head_dim explicitly",
            )
        else:
            _require_positive(self, prefix, ("head_dim",))
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"{prefix}num_kv_heads",
            f"{self.num_kv_heads} kv heads do not divide {prefix}num_heads={self.num_heads}",
        )
        _require(self.resolved_head_dim % 2 == 0, f"{prefix}head_dim",
                 "RoPE needs an even head dimension")

    def _validate_moe_placement(self, prefix: str) -> None:
        """The dense layers fit the stack and the MoE layers after them repeat exactly."""
        first = self.moe.first_dense_layers
        _require(
            0 <= first <= self.num_layers,
            f"{prefix}moe.first_dense_layers",
            f"must lie in [0, {prefix}num_layers={self.num_layers}]",
        )
        _require(
            (self.num_layers - first) % self.moe.moe_every == 0,
            f"{prefix}moe.moe_every",
            f"must divide the {self.num_layers - first} layers after the dense ones, "
            "so that the layer groups repeat exactly",
        )

    def _validate_moe_kernel(self, prefix: str) -> None:
        """mosaic_gmm tiles the model and expert widths in blocks of MOSAIC_GMM_BLOCK."""
        if self.moe.kernel != "mosaic_gmm":
            return
        for field, width in (("embed_dim", self.embed_dim), ("moe.expert_dim",
                                                              self.moe.expert_dim)):
            _require(width % MOSAIC_GMM_BLOCK == 0, f"{prefix}{field}",
                     f"{width} must be a multiple of {MOSAIC_GMM_BLOCK} for the mosaic_gmm "
                     "kernel's tiles")

    def _fp8_widths(self) -> list[tuple[str, int]]:
        """(field, width) of the contracted axis K of each kind of fp8 matmul."""
        widths = [("embed_dim", self.embed_dim)]
        if not all(self.moe_layers()):
            widths.append(("mlp_dim", self.mlp_dim))
        if self.moe is not None:
            widths.append(("moe.expert_dim", self.moe.expert_dim))
            if self.moe.num_shared_experts:
                widths.append(("moe.shared_expert_dim", self.moe.resolved_shared_dim))
        mla = self.attention.mla
        if mla is None:
            return widths + [("head_dim", self.num_heads * self.resolved_head_dim)]
        widths += [("attention.mla.kv_lora_rank", mla.kv_lora_rank),
                   ("attention.mla.v_head_dim", self.num_heads * mla.v_head_dim)]
        if mla.q_lora_rank is not None:
            widths.append(("attention.mla.q_lora_rank", mla.q_lora_rank))
        return widths

    def _validate_fp8(self, prefix: str) -> None:
        """Blockwise tiles split every fp8 matmul's contracted axis into whole blocks, and
        the experts use a kernel that takes fp8."""
        _require_positive(self, prefix, ("fp8_block_size", "fp8_history"))
        if self.fp8 == "blockwise":
            for field, width in self._fp8_widths():
                _require(width % self.fp8_block_size == 0, f"{prefix}{field}",
                         f"the fp8 matmul contracting {width} values is not whole blocks of "
                         f"{prefix}fp8_block_size={self.fp8_block_size}; pick a divisor")
        if self.fp8 != "none" and self.moe is not None:
            _require(self.moe.kernel in ("auto", "block_sparse", "sorted_einsum"),
                     f"{prefix}moe.kernel",
                     f"{self.moe.kernel} takes no fp8 operands; use auto (block_sparse under "
                     "fp8), block_sparse or sorted_einsum")

    def _validate_attention_layers(self, prefix: str) -> None:
        """MLA has a key and value per head; the splash, cudnn and pallas_gpu kernels run
        every layer's attention."""
        a = self.attention
        if a.mla is not None:
            _require(self.num_kv_heads == self.num_heads, f"{prefix}num_kv_heads",
                     "MLA gives every head its own key and value; set num_kv_heads=num_heads")
        if a.kernel not in ROW_KERNEL_LAYERS:
            return
        for index in range(self.num_layers):
            kind, position = a.layer(index)
            if kind == "ssm":
                continue
            _require(position != "alibi", f"{prefix}attention.kernel",
                     f"{a.kernel} does not run alibi positions (layer {index}); "
                     "use kernel=auto or blockwise")
            _require(kind in ROW_KERNEL_LAYERS[a.kernel], f"{prefix}attention.kernel",
                     f"{a.kernel} does not run {kind} layers (layer {index}); "
                     "use kernel=auto or blockwise")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes. One size may be -1: it takes the devices left over.

    `slices` > 1 is multislice: the data axis spans that many slices over DCN, and every
    other axis stays within a slice (ICI).

    `context` > 1 splits each sequence over that many devices (ring attention); the data path
    permutes the tokens into `context_order` first, which balances the causal work.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    context: int = 1
    slices: int = 1
    context_order: Literal["plain", "zigzag", "striped"] = "zigzag"  # see nn/context_order.py

    @property
    def shape(self) -> dict[str, int]:
        """Axis name -> size, in mesh order."""
        return {axis: getattr(self, axis) for axis in ("data", "fsdp", "tensor", "expert", "context")}

    def validate(self, prefix: str) -> None:
        """Checks the sizes; `parallel.validate_for_devices` checks them against the devices."""
        sizes = self.shape
        _require(
            list(sizes.values()).count(-1) <= 1,
            prefix.rstrip("."),
            f"at most one axis may be -1, got {sizes}",
        )
        for axis, size in sizes.items():
            _require(size == -1 or size >= 1, f"{prefix}{axis}", f"must be -1 or >= 1, got {size}")
        _require(self.slices >= 1, f"{prefix}slices", f"must be >= 1, got {self.slices}")


IMAGE_SOURCES = ("images", "image_folder", "image_tfds")  # data.source values with images


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training batches come from.

    reasoning:  the offline reasoning corpus, built on first use into `data_dir`;
    tfds:       the prepared TFDS dataset `name`, feature `text_key`, from `data_dir` (or gs://);
    text:       local files `paths` (comma-separated, globs allowed); `.jsonl` reads `text_key`;
    arithmetic: bare arithmetic problems generated in memory, without TensorFlow;
    chat:       chat or prompt/response records (SFT): JSONL files `paths`, or the TFDS
                dataset `name`; the loss is on assistant tokens only.
    images:     the offline image-text corpus (rendered pictures, questions, answers),
                built on first use into `data_dir`;
    image_folder: JSONL files `paths` of {image_key: image file, text_key: text} records,
                the image paths relative to the JSONL file;
    image_tfds: the prepared TFDS dataset `name`, features `image_key` and `text_key`.
    Image sources cut their images as `model.vision` says (`image_size` > 0).
    """

    source: Literal["reasoning", "tfds", "text", "arithmetic", "chat", "images", "image_folder",
                    "image_tfds"] = "reasoning"
    seed: int = 0  # the corpus and the order of the documents
    split: str = "train"
    eval_split: str | None = "validation"  # None: no evaluation split
    name: str | None = None  # tfds: dataset name, e.g. "lm1b" or "c4/en:3.1.0"
    text_key: str = "text"  # tfds: the text feature; text: the JSONL field
    data_dir: str | None = None  # None: $TFDS_DATA_DIR, else ~/tensorflow_datasets
    paths: str | None = None  # text: "a.txt,corpus/*.jsonl"
    tokenizer: str = "byte"  # "byte", a tokenizer.json or a SentencePiece .model
    difficulty: int = 2  # reasoning: digits, coefficient ranges, countdown numbers
    train_size: int = 20_000  # reasoning, images: problems per split
    validation_size: int = 500
    test_size: int = 500
    messages_key: str = "messages"  # chat: the list of {"role", "content"} messages
    prompt_key: str = "prompt"  # chat: a user turn, in records without messages
    response_key: str = "response"  # chat: the assistant's answer to prompt_key
    # reasoning: conversations of the synthetic assistant domain (jaxllm.data.assistant)
    # added to the train split, with demonstrations of the Constitutional AI requests
    assistant_documents: int = 0
    # reasoning: worked solutions that call the tools (`<tool>calc: ...</tool>`), written for
    # up to this many arithmetic and countdown problems of the train split and added to it
    tool_documents: int = 0
    # reasoning: every document carries an effort control token, and its worked solution is
    # cut to the level's length (jaxllm.data.tasks.effort_document)
    effort_documents: bool = False
    image_key: str = "image"  # image_folder: the JSONL field of the image file; image_tfds: feature
    max_image_pixels: int = 16_777_216  # image_folder, image_tfds: larger images are refused
    # images, image_folder, image_tfds: the share of the documents that are text-only
    # documents of the reasoning corpus (same seed and sizes), mixed in
    text_share: float = 0.0

    def validate(self, prefix: str) -> None:
        """Checks the fields; files and datasets are checked when the source is made."""
        _require(self.source != "tfds" or bool(self.name), f"{prefix}name",
                 "source=tfds needs a dataset name")
        _require(self.source != "text" or bool(self.paths), f"{prefix}paths",
                 "source=text needs file paths")
        _require(self.source != "chat" or bool(self.paths) != bool(self.name), f"{prefix}paths",
                 "source=chat reads JSONL files data.paths or the TFDS dataset data.name; set "
                 "exactly one")
        _require(self.source != "chat" or not self.paths or self.eval_split is None,
                 f"{prefix}eval_split", "JSONL files are one split; set data.eval_split=none")
        for key in ("messages_key", "prompt_key", "response_key"):
            _require(bool(getattr(self, key)), f"{prefix}{key}", "must name a record field")
        _require_positive(self, prefix, ("difficulty", "train_size", "validation_size",
                                         "test_size"))
        _require_non_negative(self, prefix, ("assistant_documents", "tool_documents"))
        _require(self.tool_documents <= self.train_size, f"{prefix}tool_documents",
                 f"must be <= {prefix}train_size={self.train_size}")
        _require(not self.effort_documents or self.source == "reasoning",
                 f"{prefix}effort_documents", "rewrites the reasoning corpus; set "
                 f"{prefix}source=reasoning or turn it off")
        self._validate_images(prefix)

    def _validate_images(self, prefix: str) -> None:
        """Checks the fields of the image sources."""
        _require(self.source != "image_folder" or bool(self.paths), f"{prefix}paths",
                 "source=image_folder needs JSONL file paths")
        _require(self.source != "image_folder" or self.eval_split is None,
                 f"{prefix}eval_split", "JSONL files are one split; set data.eval_split=none")
        _require(self.source != "image_tfds" or bool(self.name), f"{prefix}name",
                 "source=image_tfds needs a dataset name")
        _require(bool(self.image_key), f"{prefix}image_key", "must name a record field")
        _require_positive(self, prefix, ("max_image_pixels",))
        _require(0 <= self.text_share < 1, f"{prefix}text_share",
                 f"must be in [0, 1), got {self.text_share}")
        _require(self.text_share == 0 or self.source in IMAGE_SOURCES, f"{prefix}text_share",
                 f"mixes text into an image source; set {prefix}source to one of "
                 f"{IMAGE_SOURCES} or {prefix}text_share=0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loop settings."""

    steps: int = 200
    batch_size: int = 16  # global, in sequences
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per step, accumulated inside the jitted step
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # the global gradient norm is clipped to this; 0: no clipping
    z_loss: float = 0.0
    seed: int = 0
    log_every: int = 10
    peak_flops: float | None = None  # per device; None: known chip table, else measured
    eval_every: int = 50  # steps between evaluations on data.eval_split; 0: never
    eval_batches: int = 4  # validation batches per evaluation (the same ones each time)
    profile_start: int = 0  # first step of a jax.profiler trace into workdir/profile
    profile_steps: int = 0  # steps traced from profile_start; 0: no trace

    def validate(self, prefix: str) -> None:
        """Checks the fields."""
        _require_positive(self, prefix, ("steps", "batch_size", "seq_len", "grad_accum",
                                         "log_every"))
        _require(
            self.batch_size % self.grad_accum == 0,
            f"{prefix}grad_accum",
            f"{self.grad_accum} micro-batches do not divide {prefix}batch_size={self.batch_size}",
        )
        _require_non_negative(self, prefix, ("warmup_steps", "weight_decay", "grad_clip",
                                             "z_loss"))
        _require(self.learning_rate > 0, f"{prefix}learning_rate", "must be positive")
        _require(0 <= self.min_lr_ratio <= 1, f"{prefix}min_lr_ratio",
                 f"must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"{prefix}{name}", f"must be in [0, 1), got {value}")
        _require_positive(self, prefix, ("eps",))
        _require_non_negative(self, prefix, ("eval_every", "profile_start", "profile_steps"))
        _require_positive(self, prefix, ("eval_batches",))
        _require(
            self.profile_steps == 0 or self.profile_start >= 1,
            f"{prefix}profile_start",
            "steps count from 1; set the first step to trace",
        )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in `workdir/checkpoints`; a run without a workdir writes none.

    A run started on a workdir that holds checkpoints resumes from the latest complete one.
    """

    every: int = 100  # steps between async saves; the last step and SIGTERM always save
    keep: int = 3  # the newest `keep` checkpoints stay on disk
    resume_step: int | None = None  # resume from this step instead, deleting the later ones

    def validate(self, prefix: str) -> None:
        """Checks the fields."""
        _require_positive(self, prefix, ("every", "keep"))
        _require(
            self.resume_step is None or self.resume_step >= 1,
            f"{prefix}resume_step",
            f"must be a saved step >= 1 or none, got {self.resume_step}",
        )


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The RL phase: rollouts, rewards and the GRPO-family loss.

    Formulas and defaults follow `docs/references.md`, "GRPO and its variants".
    """

    group_size: int = 8  # G completions per prompt
    max_completion_len: int = 64  # L_max: sampling budget, Dr. GRPO normaliser, overlong limit
    temperature: float = 1.0
    num_iterations: int = 1  # mu: updates per rollout batch; 1: pi_old is the step's own policy
    loss_type: Literal["grpo", "dapo", "dr_grpo", "gspo"] = "grpo"
    scale_rewards: bool = True  # divide advantages by the group's std; False: Dr. GRPO
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # DAPO's clip-higher: 0.28
    beta: float = 0.0  # KL coefficient; 0 keeps no reference model
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    overlong_buffer: int = 0  # L_cache of DAPO's soft overlong penalty; 0: off
    format_reward: float = 0.0  # weight of the format reward; accuracy has weight 1
    eval_every: int = 10  # RL steps between held-out accuracy checks; 0: never
    eval_problems: int = 64  # validation problems per accuracy check
    # the task families of the RL and held-out problems, comma-separated, e.g. "sum" (the image
    # corpus's visual arithmetic); empty: every family of the data source
    families: str = ""
    # Off-policy correction (docs/rl.md): the rollout's sampler computes in this dtype (None:
    # model.dtype, the update's)
    rollout_dtype: Literal["float32", "bfloat16"] | None = None
    # weights pi_old/pi_sampler of the policy loss, TRL's modes; token_truncate: Yao et al.'s
    # truncated IS, no sequence is dropped for one outlying token
    importance_sampling: Literal["none", "token_truncate", "token_mask", "sequence_truncate",
                                 "sequence_mask"] = "token_truncate"
    importance_sampling_cap: float = 3.0  # C: weights above it are truncated to C or masked
    # delta of DeepSeek-V3.2's off-policy sequence masking: a sequence with a negative advantage
    # and mean log(pi_sampler/pi_theta) above it leaves the loss; None: off
    off_policy_mask_threshold: float | None = None
    tools: str = ""  # built-in tools rollouts and evaluations may call, e.g. "calc,countdown"
    max_tool_calls: int = 4  # per completion; later calls get an error result

    # Effort-conditioned GRPO (docs/rl.md): the levels the prompts cycle through, comma-separated
    # from instant, low, medium, high (e.g. "instant,low,medium,high"); empty: off
    efforts: str = ""
    effort_budgets: str = ""  # thinking-token budget per level, e.g. "0,8,16,32"; empty: EFFORTS
    length_penalty: float = 0.0  # lambda of the length reward relative to the budget; 0: off
    length_tolerance: float = 0.5  # rho: thinking up to rho * budget is free

    def validate(self, prefix: str) -> None:
        """Checks the fields."""
        self._validate_efforts(prefix)
        _require(not (self.tool_names and self.efforts), f"{prefix}tools",
                 "tools do not combine with grpo.efforts' budget forcing yet; set one of them")
        _require(self.rollout_dtype in (None, "float32", "bfloat16"), f"{prefix}rollout_dtype",
                 f"must be float32, bfloat16 or None, got {self.rollout_dtype!r}")
        _require_choice(self, prefix, "importance_sampling")
        _require(self.importance_sampling_cap >= 1, f"{prefix}importance_sampling_cap",
                 f"must be >= 1 (weights 1 are on-policy), got {self.importance_sampling_cap}")
        _require(self.off_policy_mask_threshold is None or self.off_policy_mask_threshold > 0,
                 f"{prefix}off_policy_mask_threshold",
                 f"must be positive or None, got {self.off_policy_mask_threshold}")
        _require(
            self.group_size >= 2,
            f"{prefix}group_size",
            f"a group needs >= 2 completions to compare, got {self.group_size}",
        )
        _require_positive(self, prefix, ("max_completion_len", "num_iterations", "temperature"))
        _require(0 <= self.epsilon_low < 1, f"{prefix}epsilon_low",
                 f"must lie in [0, 1), got {self.epsilon_low}")
        _require(self.eval_problems >= 1, f"{prefix}eval_problems",
                 f"must be >= 1, got {self.eval_problems}")
        _require_non_negative(self, prefix, ("epsilon_high", "beta", "format_reward", "eval_every",
                                             "max_tool_calls"))
        unknown = sorted(set(self.tool_names) - set(BUILTINS))
        _require(not unknown, f"{prefix}tools", f"unknown {unknown}; the built-ins are "
                 f"{sorted(BUILTINS)}")
        _require(
            0 <= self.overlong_buffer <= self.max_completion_len,
            f"{prefix}overlong_buffer",
            f"must lie in [0, {prefix}max_completion_len={self.max_completion_len}]",
        )

    @property
    def tool_names(self) -> tuple[str, ...]:
        return split_list(self.tools)

    @property
    def family_names(self) -> tuple[str, ...]:
        return split_list(self.families)

    @property
    def effort_levels(self) -> tuple[str, ...]:
        return split_list(self.efforts)

    def _validate_efforts(self, prefix: str) -> None:
        levels = self.effort_levels
        unknown = sorted(set(levels) - set(EFFORT_LEVELS))
        _require(not unknown, f"{prefix}efforts",
                 f"{unknown} are not effort levels; choose from {list(EFFORT_LEVELS)}")
        _require(len(set(levels)) == len(levels), f"{prefix}efforts",
                 f"names a level twice: {self.efforts!r}")
        budgets = split_list(self.effort_budgets)
        _require(all(b.isdigit() for b in budgets), f"{prefix}effort_budgets",
                 f"expects comma-separated integers >= 0, got {self.effort_budgets!r}")
        _require(not budgets or len(budgets) == len(levels), f"{prefix}effort_budgets",
                 f"{len(budgets)} budgets for the {len(levels)} levels of {prefix}efforts")
        _require_non_negative(self, prefix, ("length_penalty",))
        _require(self.length_penalty == 0 or bool(levels), f"{prefix}length_penalty",
                 f"the length reward is relative to an effort's budget; set {prefix}efforts")
        _require(0 <= self.length_tolerance <= 1, f"{prefix}length_tolerance",
                 f"must lie in [0, 1], got {self.length_tolerance}")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """The DPO phase: preference pairs, the loss and the reference model.

    Formulas, the rendering of a pair and the reference modes: `docs/post_training.md`.
    """

    paths: str = ""  # JSONL files of {"prompt", "chosen", "rejected"} lines; commas, globs
    eval_paths: str | None = None  # held-out pairs, scored every eval_every steps; None: none
    beta: float = 0.1  # strength of the pull to the reference (DPO's beta, IPO's tau)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO and cDPO; ipo: IPO
    label_smoothing: float = 0.0  # cDPO's epsilon, the assumed share of flipped labels
    # batch: the reference's log-probs of each step's pairs, computed at that step; cached:
    # of every pair, computed once before training into workdir/reference_logps.json
    reference: Literal["batch", "cached"] = "batch"
    eval_every: int = 10  # steps between held-out evaluations; 0: only at the last step

    def validate(self, prefix: str) -> None:
        """Checks the fields; the files are read when the phase starts."""
        _require(bool(self.paths.strip()), f"{prefix}paths", "name the JSONL files of pairs")
        _require_positive(self, prefix, ("beta",))
        _require(0 <= self.label_smoothing < 0.5, f"{prefix}label_smoothing",
                 f"must lie in [0, 0.5), got {self.label_smoothing}")
        _require(self.label_smoothing == 0 or self.loss == "sigmoid", f"{prefix}label_smoothing",
                 f"smooths the sigmoid loss only; set it to 0 for {prefix}loss={self.loss}")
        _require_non_negative(self, prefix, ("eval_every",))


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation: the student (`model`) learns from a frozen teacher's logits on
    the pretraining data. Formulas: `docs/post_training.md`, "Distillation"."""

    teacher: str | None = None  # the teacher run's workdir; its vocabulary must be model's
    kind: Literal["forward", "reverse"] = "forward"  # KL(teacher||student) or KL(student||teacher)
    alpha: float = 1.0  # loss = alpha * T^2 * KL + (1 - alpha) * cross-entropy
    temperature: float = 1.0  # T: both distributions are softened by it

    def validate(self, prefix: str) -> None:
        """Checks the fields; the teacher's vocabulary is checked when the phase starts."""
        _require(bool(self.teacher), f"{prefix}teacher",
                 f"name the teacher run's workdir, e.g. {prefix}teacher=runs/teacher")
        _require(0 <= self.alpha <= 1, f"{prefix}alpha", f"must lie in [0, 1], got {self.alpha}")
        _require(self.temperature > 0, f"{prefix}temperature",
                 f"must be positive, got {self.temperature}")


# The constitution of `jaxllm constitution` without --principles: the four principles
# helpful and harmless, respect user agency, honest about limitations, avoid deception.
DEFAULT_PRINCIPLES = (
    "Be helpful and harmless.",
    "Respect the user's agency.",
    "Be honest about your limitations.",
    "Never deceive the user.",
)


@dataclasses.dataclass(frozen=True)
class ConstitutionConfig:
    """The Constitutional AI pipeline (`jaxllm constitution`): responses, critiques and
    revisions, SFT on the revisions, AI feedback, then DPO on it, from `init_from`'s model.
    Stages, templates and files: `docs/post_training.md`, "Constitutional AI"."""

    # JSONL of {"messages": [...], "kind": "red_team"|"helpful"} lines (or {"prompt": str});
    # synthetic: the train split of the synthetic assistant domain (jaxllm.data.assistant)
    prompts: str = "synthetic"
    num_prompts: int = 384  # synthetic: how many prompts
    batch_size: int = 64  # conversations per generation batch
    max_new_tokens: int = 64  # per response, critique and revision
    temperature: float = 1.0
    critique_template: str = "Critique the last response by this principle: {principle}"
    revision_template: str = "Rewrite the response to follow the principle."
    judge_template: str = ("{request}\n(A) {a}\n(B) {b}\nWhich response follows the "
                           "principle better: {principle}")
    min_judge_probability: float = 0.6  # a pair is kept when the judge prefers it this much
    sft_steps: int = 100
    sft_learning_rate: float = 1e-3
    dpo_steps: int = 100
    dpo_learning_rate: float = 1e-4

    def validate(self, prefix: str) -> None:
        """Checks the fields; the prompts file is read when the pipeline starts."""
        _require(bool(self.prompts), f"{prefix}prompts", "name a JSONL file, or synthetic")
        _require_positive(self, prefix, ("num_prompts", "batch_size", "max_new_tokens",
                                         "temperature", "sft_steps", "sft_learning_rate",
                                         "dpo_steps", "dpo_learning_rate"))
        _require(0.5 <= self.min_judge_probability < 1, f"{prefix}min_judge_probability",
                 f"must lie in [0.5, 1), got {self.min_judge_probability}")
        fields = {"critique_template": ("principle",), "revision_template": ("principle",),
                  "judge_template": ("principle", "request", "a", "b")}
        for field, names in fields.items():
            try:
                getattr(self, field).format(**{name: "" for name in names})
            except (KeyError, IndexError, ValueError) as error:
                raise ConfigError(f"{prefix}{field}: fills only {{{'}, {'.join(names)}}}; "
                                  f"{type(error).__name__}: {error}") from None


@dataclasses.dataclass(frozen=True)
class Config:
    """One run: a model, a mesh, data and training settings, and where to write."""

    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    grpo: GRPOConfig | None = None  # the RL phase; None for pretraining only
    dpo: DPOConfig | None = None  # the DPO phase; None for the other phases
    distill: DistillConfig | None = None  # the distillation phase's teacher and loss
    constitution: ConstitutionConfig | None = None  # the Constitutional AI pipeline
    workdir: str | None = None
    init_from: str | None = None  # a run's workdir whose latest weights this run starts from


# ---------------------------------------------------------------------------------------
# Validation of a whole config


def validate(config: Config) -> Config:
    """Checks every field that can be checked without devices. Returns `config`."""
    config.model.validate("model.")
    config.mesh.validate("mesh.")
    config.train.validate("train.")
    config.checkpoint.validate("checkpoint.")
    if config.grpo is not None:
        config.grpo.validate("grpo.")
    if config.dpo is not None:
        config.dpo.validate("dpo.")
    if config.distill is not None:
        config.distill.validate("distill.")
    if config.constitution is not None:
        config.constitution.validate("constitution.")
    config.data.validate("data.")
    _validate_across_sections(config)
    return config


def _validate_across_sections(config: Config) -> None:
    """The checks that read more than one section; each section has passed its own."""
    t, a = config.train, config.model.attention
    _require(
        config.mesh.context == 1 or "ssm" not in a.pattern.split(","),
        "mesh.context",
        "SSM layers do not pass their state between sequence shards; set mesh.context=1 or "
        "drop the ssm entries of model.attention.pattern",
    )
    _require(
        config.data.source not in IMAGE_SOURCES or config.model.vision.image_size > 0,
        "model.vision.image_size",
        f"data.source={config.data.source} feeds images; set model.vision.image_size to the "
        "pixels of the model's square images",
    )
    _require(
        a.kernel != "blockwise" or t.seq_len % min(a.block_size, t.seq_len) == 0,
        "train.seq_len",
        f"{t.seq_len} must be a multiple of model.attention.block_size={a.block_size} for "
        "the blockwise kernel",
    )
    _require(
        a.kernel != "pallas_gpu" or t.seq_len % 16 == 0,
        "train.seq_len",
        f"{t.seq_len} must be a multiple of 16 for the pallas_gpu kernel's blocks",
    )
    _require(
        t.profile_steps == 0 or config.workdir is not None,
        "train.profile_steps",
        "the trace goes to workdir/profile; set workdir",
    )
    if config.grpo is not None:
        _require(
            t.batch_size % config.grpo.group_size == 0,
            "train.batch_size",
            f"an RL batch is whole groups: {t.batch_size} sequences do not split into groups "
            f"of grpo.group_size={config.grpo.group_size}",
        )
    if config.dpo is not None:
        _require(t.batch_size % 2 == 0, "train.batch_size",
                 f"a DPO batch is a chosen and a rejected row per pair: {t.batch_size} is odd")
        _require(t.grad_accum == 1, "train.grad_accum",
                 "the DPO step takes its whole batch at once; set it to 1")


# ---------------------------------------------------------------------------------------
# Overrides: "train.steps=50", "model.dtype=bfloat16", "workdir=runs/a"


def _coerce(text: str, annotation: Any, field: str) -> Any:
    """Parses `text` into the type `annotation` names."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        _require(text in choices, field, f"must be one of {list(choices)}, got {text!r}")
        return text
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null") and len(options) < len(typing.get_args(annotation)):
            return None
        (annotation,) = options
    if annotation is bool:
        lowered = text.lower()
        _require(lowered in ("true", "false", "1", "0"), field, f"expects true/false, got {text!r}")
        return lowered in ("true", "1")
    if annotation in (int, float, str):
        try:
            value = float(text) if annotation is float else annotation(text)
        except ValueError:
            raise ConfigError(f"{field}: expects {annotation.__name__}, got {text!r}") from None
        return value
    raise ConfigError(f"{field}: cannot be set from the command line")


def _section_type(annotation: Any, field: str) -> type:
    """The dataclass in `Section | None`, for setting a field of a section that is unset."""
    options = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
    if len(options) != 1:
        raise ConfigError(f"{field}: is a value and has no fields")
    return options[0]


def _set(node: Any, path: list[str], text: str, prefix: str) -> Any:
    key = path[0]
    fields = {f.name: f for f in dataclasses.fields(node)}
    full = f"{prefix}{key}"
    if key not in fields:
        raise ConfigError(f"{full}: unknown key; valid keys here are {sorted(fields)}")
    value = getattr(node, key)
    if value is None and len(path) > 1:
        value = _section_type(typing.get_type_hints(type(node))[key], full)()
    if dataclasses.is_dataclass(value):
        if len(path) == 1:
            raise ConfigError(f"{full}: is a section; set one of its fields, e.g. {full}.x=...")
        new = _set(value, path[1:], text, f"{full}.")
    else:
        if len(path) > 1:
            raise ConfigError(f"{full}: is a value and has no field {path[1]!r}")
        hints = typing.get_type_hints(type(node))
        new = _coerce(text, hints[key], full)
    return dataclasses.replace(node, **{key: new})


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Applies `key.sub=value` strings in order, then validates."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r}: overrides look like key.sub=value")
        config = _set(config, key.split("."), text, "")
    return validate(config)


# ---------------------------------------------------------------------------------------
# Experiment files and serialisation


def load_experiment(path: str | Path) -> Config:
    """Runs an experiment file and returns the `Config` its `config()` function builds."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"jaxllm_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "config", None)):
        raise ConfigError(f"{path}: an experiment file must define config() -> jaxllm.Config")
    config = module.config()
    if not isinstance(config, Config):
        raise ConfigError(f"{path}: config() returned {type(config).__name__}, not Config")
    return validate(config)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _build(cls: type, data: dict[str, Any]) -> Any:
    """The dataclass `cls` from a dict, building its nested sections (and `Section | None`)
    from their dicts. Fields the dict lacks keep their defaults: configs saved before a field
    existed still load."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        options = [a for a in (hints[key], *typing.get_args(hints[key]))
                   if dataclasses.is_dataclass(a)]
        kwargs[key] = _build(options[0], value) if options and isinstance(value, dict) else value
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of `to_dict`, for configs read back from a workdir."""
    return validate(_build(Config, data))


def save(config: Config, path: str | Path) -> None:
    """Writes `config` as JSON to `path`, a local path or a gs:// URL."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(config), indent=2) + "\n")
