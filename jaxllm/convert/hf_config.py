"""Hugging Face `config.json` <-> `ModelConfig`, per model family.

Families: Llama (2/3), Mistral, Qwen2/2.5, Qwen3, Mixtral, Qwen3-MoE and DeepSeek-V3. A
setting our model cannot reproduce exactly is refused with `ConversionError` naming it.
"""

from typing import Any

from jaxllm.config import AttentionConfig, MLAConfig, ModelConfig, MoEConfig

# model_type -> the HF architecture that export names
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")


class ConversionError(ValueError):
    """A checkpoint cannot be converted. The message names the setting or tensor."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConversionError(message)


def family(hf: dict[str, Any]) -> str:
    """The checked `model_type` of an HF config."""
    kind = hf.get("model_type")
    _require(kind in FAMILIES, f"config.json: model_type {kind!r} is not supported; "
                               f"supported are {sorted(FAMILIES)}")
    return kind


ROPE_FIELDS = {  # what each RoPE scaling reads
    "linear": ("factor",),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings: `rope_parameters` (transformers 5), else `rope_theta` plus
    `rope_scaling` (earlier files)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _attention(hf: dict[str, Any], kind: str) -> AttentionConfig:
    """Masks, RoPE scaling, q/k norm, qkv bias and MLA of an HF config."""
    rope = rope_parameters(hf)
    if rope["rope_type"] == "yarn":  # as transformers reads it
        rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    missing = [key for key in ROPE_FIELDS.get(rope["rope_type"], ()) if rope.get(key) is None]
    _require(not missing, f"config.json: rope_type {rope['rope_type']!r} needs "
                          f"{', '.join(missing)}")
    scaling = {}
    if rope["rope_type"] == "linear":
        scaling = dict(rope_scaling="linear", rope_factor=float(rope["factor"]))
    elif rope["rope_type"] == "llama3":
        scaling = dict(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                       rope_original_len=int(rope["original_max_position_embeddings"]),
                       rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]))
    elif rope["rope_type"] == "yarn":
        for name, default in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True)):
            _require(rope.get(name) in (None, default),
                     f"config.json: rope {name}={rope.get(name)} is not supported (only {default})")
        if kind == "deepseek_v3":  # HF scales the softmax by mscale^2 only with both set
            _require(rope.get("mscale") == rope.get("mscale_all_dim") == 1,
                     "config.json: DeepSeek YaRN needs mscale = mscale_all_dim = 1, got "
                     f"{rope.get('mscale')} and {rope.get('mscale_all_dim')}")
        else:
            _require(rope.get("attention_factor") is None and not rope.get("mscale"),
                     "config.json: a YaRN attention_factor or mscale is not supported")
        scaling = dict(rope_scaling="yarn", rope_factor=float(rope["factor"]),
                       rope_original_len=int(rope["original_max_position_embeddings"]))
    else:
        _require(rope["rope_type"] == "default",
                 f"config.json: rope_type {rope['rope_type']!r} is not supported")
    window = hf.get("sliding_window")
    if kind in ("qwen2", "qwen3", "qwen3_moe"):  # Qwen slides only above max_window_layers
        _require(not hf.get("use_sliding_window"),
                 "config.json: use_sliding_window=true is not supported for Qwen models")
        window = None
    mla = None
    if kind == "deepseek_v3":
        mla = MLAConfig(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                        qk_nope_head_dim=hf["qk_nope_head_dim"],
                        qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"])
    return AttentionConfig(
        pattern="global" if window is None else "sliding",
        window=window or AttentionConfig.window,
        qk_norm="rms" if kind in ("qwen3", "qwen3_moe") else "none",
        qkv_bias=kind == "qwen2",
        mla=mla,
        **scaling,
    )


def _moe(hf: dict[str, Any], kind: str) -> MoEConfig | None:
    """The MoE layers of an HF config; None for a dense family."""
    if kind == "mixtral":
        return MoEConfig(num_experts=hf["num_local_experts"],
                         experts_per_token=hf["num_experts_per_tok"],
                         expert_dim=hf["intermediate_size"], router="softmax")
    if kind == "qwen3_moe":
        _require(hf.get("decoder_sparse_step", 1) == 1 and not hf.get("mlp_only_layers"),
                 "config.json: decoder_sparse_step > 1 or mlp_only_layers are not supported")
        return MoEConfig(num_experts=hf.get("num_experts") or hf["num_local_experts"],
                         experts_per_token=hf["num_experts_per_tok"],
                         expert_dim=hf["moe_intermediate_size"], router="softmax",
                         norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
    if kind == "deepseek_v3":
        _require(hf.get("moe_layer_freq", 1) == 1,
                 "config.json: moe_layer_freq > 1 is not supported")
        _require(hf.get("scoring_func", "sigmoid") == "sigmoid",
                 "config.json: DeepSeek scoring_func other than sigmoid is not supported")
        return MoEConfig(
            num_experts=hf["n_routed_experts"], experts_per_token=hf["num_experts_per_tok"],
            expert_dim=hf["moe_intermediate_size"],
            num_shared_experts=hf.get("n_shared_experts") or 0,
            router="sigmoid", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
            first_dense_layers=hf.get("first_k_dense_replace", 0),
        )
    return None


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our model config for an HF `config.json`, checked for what we cannot reproduce.

    Tied embeddings become an untied head holding a copy of the embedding: our tied head
    scales its logits, HF's does not.
    """
    kind = family(hf)
    missing = [key for key in REQUIRED if key not in hf]
    _require(not missing, f"config.json: missing {', '.join(missing)}")
    _require(hf.get("hidden_act", "silu") == "silu",
             f"config.json: hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    _require(not hf.get("mlp_bias"), "config.json: mlp_bias=true is not supported")
    _require(kind == "qwen2" or not hf.get("attention_bias"),
             "config.json: attention_bias=true (biases on all four projections) is not supported")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        rope_theta=float(rope_parameters(hf)["rope_theta"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        moe=_moe(hf, kind),
        attention=_attention(hf, kind),
    )


def _rope_to_hf(m: ModelConfig) -> dict[str, Any]:
    a = m.attention
    rope: dict[str, Any] = {"rope_theta": m.rope_theta, "rope_type": "default"}
    if a.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=a.rope_factor)
    elif a.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=a.rope_factor,
                    original_max_position_embeddings=a.rope_original_len,
                    low_freq_factor=a.rope_low_freq_factor,
                    high_freq_factor=a.rope_high_freq_factor)
    elif a.rope_scaling == "yarn":
        rope.update(rope_type="yarn", factor=a.rope_factor,
                    original_max_position_embeddings=a.rope_original_len)
        if a.mla is not None:
            rope.update(mscale=1.0, mscale_all_dim=1.0)
    return rope


def to_hf(m: ModelConfig, kind: str) -> dict[str, Any]:
    """The HF `config.json` of family `kind` for our model `m`."""
    family({"model_type": kind})
    a, moe = m.attention, m.moe
    hf: dict[str, Any] = {
        "architectures": [FAMILIES[kind]], "model_type": kind, "vocab_size": m.vocab_size,
        "hidden_size": m.embed_dim, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.resolved_head_dim, "intermediate_size": m.mlp_dim,
        "rms_norm_eps": m.norm_eps, "hidden_act": "silu", "tie_word_embeddings": False,
        "rope_parameters": _rope_to_hf(m), "dtype": "float32", "torch_dtype": "float32",
        "sliding_window": a.window if a.pattern == "sliding" else None,
    }
    if kind in ("qwen2", "qwen3", "qwen3_moe"):
        hf["use_sliding_window"] = False
    if kind == "mixtral":
        hf.update(num_local_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
                  intermediate_size=moe.expert_dim)
    elif kind == "qwen3_moe":
        hf.update(num_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
                  moe_intermediate_size=moe.expert_dim, norm_topk_prob=moe.norm_topk_prob,
                  decoder_sparse_step=1, mlp_only_layers=[])
    elif kind == "deepseek_v3":
        mla = a.mla
        hf.update(
            q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
            qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
            v_head_dim=mla.v_head_dim, head_dim=mla.qk_rope_head_dim, rope_interleave=True,
            n_routed_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
            moe_intermediate_size=moe.expert_dim, n_shared_experts=moe.num_shared_experts,
            norm_topk_prob=moe.norm_topk_prob, routed_scaling_factor=moe.routed_scaling_factor,
            n_group=moe.n_group, topk_group=moe.topk_group,
            first_k_dense_replace=moe.first_dense_layers, num_nextn_predict_layers=0,
        )
    return hf


def check_exportable(m: ModelConfig, kind: str) -> None:
    """Raises ConversionError if family `kind` cannot hold our model `m`."""
    a, moe = m.attention, m.moe
    checks = [
        ("ssm" not in a.pattern.split(","),
         "model.attention.pattern: SSM (Mamba-2) layers have no Hugging Face family here, so "
         "a hybrid model cannot be exported"),
        (a.pattern == "global" or (a.pattern == "sliding" and kind in ("mistral", "mixtral")),
         "model.attention.pattern: only Mistral and Mixtral have sliding layers"),
        (not m.vision.image_size,
         "model.vision.image_size: the Hugging Face text families have no patch embedding, "
         "so an early-fusion model cannot be exported"),
        (a.positions == "rope", "model.attention.positions: HF families use RoPE"),
        (a.qkv_bias == (kind == "qwen2"), f"model.attention.qkv_bias must be {kind == 'qwen2'}"),
        (a.qk_norm == ("rms" if kind in ("qwen3", "qwen3_moe") else "none"),
         f"model.attention.qk_norm does not match {kind}"),
        ((a.mla is not None) == (kind == "deepseek_v3"),
         f"model.attention.mla does not match {kind}"),
        ((moe is not None) == (kind in ("mixtral", "qwen3_moe", "deepseek_v3")),
         f"model.moe does not match {kind}"),
        (moe is None or moe.moe_every == 1, "model.moe.moe_every must be 1"),
        (moe is None or (moe.router == "sigmoid") == (kind == "deepseek_v3"),
         f"model.moe.router does not match {kind}"),
        (moe is None or kind == "deepseek_v3" or (moe.first_dense_layers == 0 and
                                                  moe.num_shared_experts == 0),
         f"{kind} has no dense layers or shared experts"),
        (moe is None or moe.shared_expert_dim in (None, moe.expert_dim),
         "model.moe.shared_expert_dim must equal expert_dim (HF's shared experts are "
         "moe_intermediate_size wide)"),
        (kind != "mixtral" or moe.norm_topk_prob, "mixtral always renormalises its top-k"),
        (moe is None or kind == "deepseek_v3" or moe.routed_scaling_factor == 1,
         "model.moe.routed_scaling_factor must be 1"),
    ]
    for ok, message in checks:
        _require(ok, f"cannot export as {kind}: {message}")
