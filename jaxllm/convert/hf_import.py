"""`jaxllm convert hf-import`: an HF checkpoint directory -> a jaxllm workdir.

The workdir holds `config.json`, an orbax checkpoint at step 0 (the weights, a fresh
optimizer state), and in `hf/` the HF config, tokenizer and chat-template files, so that
`generate`, `eval`, `pretrain` (continued on the same workdir) and `grpo`
(`init_from=WORKDIR`) start from it and `hf-export` can write it back.
"""

import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.convert import hf_config, hf_weights
from jaxllm.convert.hf_files import SafetensorsReader, read_json
from jaxllm.nn import Transformer
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.optimizer import make_optimizer
from jaxllm.train.state import TrainState, abstract_state

# Files copied into WORKDIR/hf: what export and the tokenizer need besides the weights.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def load_variables(hf_dir: str | Path, model: config_lib.ModelConfig, mesh,
                   log: Callable[[str], None] = print) -> dict:
    """The "params" and "moe_bias" of our `model`, read lazily from the HF checkpoint in
    `hf_dir` straight into the shardings the logical-axis rules give them on `mesh`."""
    hf = read_json(Path(hf_dir) / "config.json")
    kind = hf_config.family(hf)
    reader = SafetensorsReader(hf_dir)
    layers = hf_weights.layer_rules(model, kind, hf)
    top = hf_weights.top_rules(tied="lm_head.weight" not in reader.names())
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    boxed = jax.eval_shape(Transformer(model).init, jax.random.key(0), tokens)
    boxed = {name: boxed[name] for name in ("params", "moe_bias") if name in boxed}
    shardings = parallel.shardings(boxed, mesh)
    abstract = nn.meta.unbox(boxed)
    shapes = {_keys(path): x.shape
              for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}

    def load(path, _, sharding):
        leaf = hf_weights.leaf_of(_keys(path), model, layers, top)
        return hf_weights.load_leaf(reader, leaf, shapes, sharding)

    variables = jax.tree_util.tree_map_with_path(load, abstract, shardings)
    _report_unused(reader, model.num_layers, log)
    return variables


def _keys(path) -> tuple[str, ...]:
    """A tree path as the tuple of its dict keys."""
    return tuple(k.key for k in path)


def _report_unused(reader: SafetensorsReader, num_layers: int, log) -> None:
    """Warns about the checkpoint's tensors that were not read, e.g. DeepSeek's
    multi-token-prediction layers (layer indices >= num_hidden_layers)."""
    unused = sorted(reader.names() - reader.read)
    extra = [n for n in unused
             if (m := re.match(r"model\.layers\.(\d+)\.", n)) and int(m[1]) >= num_layers]
    if extra:
        log(f"warning: skipped {len(extra)} tensors of layers >= num_hidden_layers={num_layers} "
            "(the multi-token-prediction module), which the model does not use")
    other = [n for n in unused if n not in extra]
    if other:
        log(f"warning: {len(other)} tensors were not used: {', '.join(other[:10])}"
            f"{' ...' if len(other) > 10 else ''}")


def _copy_side_files(hf_dir: Path, workdir: Path) -> Path:
    """Copies the HF config, tokenizer and chat-template files into WORKDIR/hf."""
    target = workdir / "hf"
    target.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, target / name)
    return target


def tokenizer_spec(hf_dir: Path) -> str | None:
    """The tokenizer file of an HF directory: tokenizer.json, else tokenizer.model."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (hf_dir / name).is_file():
            return str((hf_dir / name).absolute())
    return None


def import_hf(hf_dir: str | Path, workdir: str | Path, overrides: Sequence[str] = (),
              log: Callable[[str], None] = print) -> config_lib.Config:
    """Converts the HF checkpoint in `hf_dir` into a jaxllm workdir; returns its config.

    `overrides` (`key.sub=value`) set the rest of the run, e.g. `mesh.fsdp=8` to load a
    model too large for one device.
    """
    hf_dir, workdir = Path(hf_dir), Path(workdir).absolute()
    SafetensorsReader(hf_dir)  # refuses a directory of pickled weights before anything else
    model = hf_config.from_hf(read_json(hf_dir / "config.json"))
    side = _copy_side_files(hf_dir, workdir)
    tokenizer = tokenizer_spec(side)
    if tokenizer is None:
        log(f"warning: {hf_dir} holds no tokenizer.json or tokenizer.model; data.tokenizer "
            "stays 'byte'")
    config = config_lib.Config(
        model=model, workdir=str(workdir),
        data=config_lib.DataConfig(tokenizer=tokenizer or "byte"),
    )
    config = config_lib.apply_overrides(config, list(overrides))
    if config.model.lora is not None:
        raise config_lib.ConfigError(
            "model.lora: an import holds the base model; set model.lora on the run that "
            f"starts from it (init_from={workdir})")
    mesh = parallel.make_mesh(config)
    variables = load_variables(hf_dir, config.model, mesh, log)
    tx = make_optimizer(config.train)
    target = abstract_state(Transformer(config.model), tx, 8, mesh)  # the optimizer's layout
    shardings = jax.tree.map(lambda x: x.sharding, target.opt_state)
    opt_state = jax.jit(tx.init, out_shardings=shardings)(variables["params"])
    rng = jax.random.split(jax.random.key(config.train.seed))[1]
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], opt_state, rng,
                       variables.get("moe_bias", {}))
    workdir_lib.save_config(config, workdir)
    checkpoints = Checkpointer(workdir / "checkpoints", config.checkpoint)
    checkpoints.save(0, state, config, force=True)
    checkpoints.close()
    log(f"wrote {workdir}: {hf_config.family(read_json(side / 'config.json'))} model, "
        f"{sum(x.size for x in jax.tree.leaves(variables['params'])):,} parameters")
    return config
