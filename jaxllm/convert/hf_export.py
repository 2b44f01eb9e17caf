"""`jaxllm convert hf-export`: a jaxllm workdir -> an HF checkpoint directory that
`transformers` loads (safetensors shards, their index, `config.json`, tokenizer files)."""

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxllm import config as config_lib
from jaxllm.convert import hf_config, hf_weights
from jaxllm.convert.hf_files import read_json, write_shards
from jaxllm.convert.hf_import import SIDE_FILES
from jaxllm.nn import lora as lora_lib
from jaxllm.train.run import load_run

# Keys of an imported config.json that our own settings replace.
_REPLACED = ("rope_scaling", "rope_theta", "torch_dtype", "dtype", "quantization_config")


def export_variables(variables: dict, model: config_lib.ModelConfig, kind: str):
    """(HF name, array) of every tensor of family `kind` for our "params" and "moe_bias".

    A tied head becomes an untied `lm_head` holding the embedding times embed_dim**-0.5,
    the scale our tied head applies.
    """
    params = dict(variables["params"])
    if model.tie_embeddings:
        params["head"] = {"kernel": params["embedding"].T * model.embed_dim**-0.5}
    variables = {**variables, "params": params}
    layers = hf_weights.layer_rules(model, kind, {"rope_interleave": True})
    return hf_weights.hf_tensors(variables, model, layers, hf_weights.top_rules(tied=False))


def hf_config_json(model: config_lib.ModelConfig, kind: str, imported: dict | None) -> dict:
    """The exported config.json: the imported one (token ids, context length, ...) with our
    model's settings over it."""
    base = {k: v for k, v in (imported or {}).items() if k not in _REPLACED}
    return {**base, **hf_config.to_hf(model, kind)}


def write_hf(variables: dict, model: config_lib.ModelConfig, kind: str, out: str | Path,
             imported: dict | None = None) -> Path:
    """Writes our "params" (and "moe_bias") as an HF checkpoint of family `kind` in `out`;
    `imported` is the config.json the model came from, if any."""
    hf_config.check_exportable(model, kind)
    out = Path(out)
    write_shards(export_variables(variables, model, kind), out)
    hf = hf_config_json(model, kind, imported)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return out


def merged(model: config_lib.ModelConfig, params: dict
           ) -> tuple[config_lib.ModelConfig, dict]:
    """(model, params) with any LoRA adapters folded into the kernels: the same function as
    a model without adapters."""
    if model.active_lora is None:
        return model, params
    return dataclasses.replace(model, lora=None), lora_lib.merge(params, model.active_lora)


def export_hf(workdir: str | Path, out: str | Path, kind: str | None = None,
              overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> Path:
    """Writes the latest checkpoint of `workdir` as an HF checkpoint of family `kind`
    (default: the family it was imported from) into `out`, with the imported tokenizer
    and chat-template files. The checkpoint is restored on one device, or on the mesh that
    `overrides` set (`load_run`); one layer (or expert) at a time comes to the host. A LoRA
    run's adapters are merged into its kernels first (`merged`)."""
    workdir, out = Path(workdir), Path(out)
    side = workdir / "hf"
    imported = read_json(side / "config.json") if (side / "config.json").is_file() else None
    kind = kind or (imported or {}).get("model_type")
    if kind is None:
        raise hf_config.ConversionError(
            f"{workdir} was not imported from HF; name the family with --family, one of "
            f"{sorted(hf_config.FAMILIES)}")
    config, _, state = load_run(workdir, overrides)
    model, params = merged(config.model, state.params)
    variables = {"params": params}
    if state.moe_bias:
        variables["moe_bias"] = state.moe_bias
    write_hf(variables, model, kind, out, imported)
    for name in SIDE_FILES:
        if name != "config.json" and (side / name).is_file():
            shutil.copyfile(side / name, out / name)
    log(f"wrote {out}: a {kind} checkpoint")
    return out
