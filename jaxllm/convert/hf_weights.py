"""Our variables <-> HF tensors: names, layouts and shapes, per model family.

A `Rule` maps some of one layer's (or one expert's) arrays in our layout to some HF tensors
and back. Our layer stacks carry a leading scan axis, and routed experts an expert axis;
the rules see one layer and one expert at a time, so a leaf is assembled piece by piece
and no whole stack is ever held in host memory.
"""

import dataclasses
import re
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.convert.hf_config import ConversionError
from jaxllm.nn.transformer import layer_number


@dataclasses.dataclass(frozen=True)
class Rule:
    """Our arrays `ours` (paths inside a block, e.g. "params/attn/query/kernel") <-> the HF
    tensors `hf` (names inside a layer; "{x}" is the expert). `to_ours(*hf) -> tuple` and
    `to_hf(*ours) -> tuple` convert; `expert` rules hold one routed expert each."""

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    to_ours: Callable
    to_hf: Callable
    expert: bool = False


def _one(path: str, name: str, to_ours=lambda w: w, to_hf=lambda w: w, expert=False) -> Rule:
    """A rule between one array and one tensor."""
    return Rule((path,), (name,), lambda w: (to_ours(w),), lambda w: (to_hf(w),), expert)


def _heads_in(path: str, name: str, heads: int, perm=None) -> Rule:
    """HF [heads * dim, in] <-> ours [in, heads, dim]; `perm` reorders each head's dims."""
    inverse = None if perm is None else np.argsort(perm)

    def to_ours(w):
        k = w.T.reshape(w.shape[1], heads, -1)
        return k if perm is None else k[..., perm]

    def to_hf(k):
        k = k if inverse is None else k[..., inverse]
        return k.reshape(k.shape[0], -1).T

    return _one(path, name, to_ours, to_hf)


def _heads_out(path: str, name: str, heads: int) -> Rule:
    """HF o_proj [out, heads * dim] <-> ours [heads, dim, out]."""
    return _one(path, name, lambda w: w.T.reshape(heads, -1, w.shape[0]),
                lambda k: k.reshape(-1, k.shape[-1]).T)


def _swiglu(prefix: str, gate: str, up: str, down: str, expert=False) -> list[Rule]:
    """SwiGLU: gate and up [F, E] <-> wi [E, 2, F]; down [E, F] <-> wo [F, E]."""
    wi = Rule((f"{prefix}wi{'' if expert else '/kernel'}",), (gate, up),
              lambda g, u: (np.stack([g.T, u.T], axis=1),),
              lambda k: (k[:, 0].T, k[:, 1].T), expert)
    wo = _one(f"{prefix}wo{'' if expert else '/kernel'}", down, lambda w: w.T, lambda k: k.T,
              expert)
    return [wi, wo]


def _deinterleave(width: int, rope: int) -> np.ndarray:
    """The permutation of a `width`-wide head whose last `rope` dims are interleaved pairs
    (x0, y0, x1, y1, ...) into our rotate_half layout (x0, x1, ..., y0, y1, ...)."""
    start = width - rope
    return np.concatenate([np.arange(start), start + np.arange(0, rope, 2),
                           start + np.arange(1, rope, 2)])


def _attention_rules(cfg: ModelConfig, kind: str) -> list[Rule]:
    """Standard attention: q/k/v/o projections, Qwen2's biases, Qwen3's q/k norms."""
    h, kv = cfg.num_heads, cfg.num_kv_heads
    rules = [
        _heads_in("params/attn/query/kernel", "self_attn.q_proj.weight", h),
        _heads_in("params/attn/key/kernel", "self_attn.k_proj.weight", kv),
        _heads_in("params/attn/value/kernel", "self_attn.v_proj.weight", kv),
        _heads_out("params/attn/out/kernel", "self_attn.o_proj.weight", h),
    ]
    if cfg.attention.qkv_bias:
        for ours, name, heads in (("query", "q", h), ("key", "k", kv), ("value", "v", kv)):
            rules.append(_one(f"params/attn/{ours}/bias", f"self_attn.{name}_proj.bias",
                              lambda b, n=heads: b.reshape(n, -1), lambda b: b.reshape(-1)))
    if cfg.attention.qk_norm == "rms":
        rules += [_one("params/attn/query_norm/scale", "self_attn.q_norm.weight"),
                  _one("params/attn/key_norm/scale", "self_attn.k_norm.weight")]
    return rules


def _mla_rules(cfg: ModelConfig, interleaved: bool) -> list[Rule]:
    """DeepSeek's MLA; interleaved rotary dims are permuted into our layout."""
    m, h = cfg.attention.mla, cfg.num_heads
    width, rank = m.qk_nope_head_dim + m.qk_rope_head_dim, m.kv_lora_rank
    perm = _deinterleave(width, m.qk_rope_head_dim) if interleaved else None
    kv_perm = _deinterleave(rank + m.qk_rope_head_dim, m.qk_rope_head_dim) if interleaved else None
    kv_inverse = None if kv_perm is None else np.argsort(kv_perm)
    rules = [
        _one("params/attn/kv_down/kernel", "self_attn.kv_a_proj_with_mqa.weight",
             lambda w: w.T if kv_perm is None else w.T[:, kv_perm],
             lambda k: (k if kv_inverse is None else k[:, kv_inverse]).T),
        _one("params/attn/kv_norm/scale", "self_attn.kv_a_layernorm.weight"),
        Rule(("params/attn/key_up/kernel", "params/attn/value_up/kernel"),
             ("self_attn.kv_b_proj.weight",),
             lambda w: tuple(np.split(w.T.reshape(rank, h, -1), [m.qk_nope_head_dim], -1)),
             lambda ku, vu: (jnp.concatenate([ku, vu], -1).reshape(rank, -1).T,)),
        _heads_out("params/attn/out/kernel", "self_attn.o_proj.weight", h),
    ]
    if m.q_lora_rank is None:
        return rules + [_heads_in("params/attn/query/kernel", "self_attn.q_proj.weight", h, perm)]
    return rules + [
        _one("params/attn/query_down/kernel", "self_attn.q_a_proj.weight", lambda w: w.T,
             lambda k: k.T),
        _one("params/attn/query_norm/scale", "self_attn.q_a_layernorm.weight"),
        _heads_in("params/attn/query_up/kernel", "self_attn.q_b_proj.weight", h, perm),
    ]


def _moe_rules(kind: str) -> list[Rule]:
    """Router, routed experts (one rule application per expert), shared experts and the
    DeepSeek selection bias."""
    if kind == "mixtral":
        prefix, names = "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        prefix, names = "mlp.", ("gate_proj", "up_proj", "down_proj")
    experts = [f"{prefix}experts.{{x}}.{n}.weight" for n in names]
    rules = [_one("params/moe/router/kernel", f"{prefix}gate.weight", lambda w: w.T,
                  lambda k: k.T)]
    rules += _swiglu("params/moe/", *experts, expert=True)
    if kind == "deepseek_v3":
        shared = [f"mlp.shared_experts.{n}.weight" for n in names]
        rules += _swiglu("params/moe/shared/", *shared)
        rules.append(_one("moe_bias/moe/e_score_correction_bias",
                          "mlp.gate.e_score_correction_bias"))
    return rules


def layer_rules(cfg: ModelConfig, kind: str, hf: dict) -> dict[str, tuple[Rule, int]]:
    """Our path inside a block -> (its rule, its position in `rule.ours`)."""
    rules = [
        _one("params/attn_norm/scale", "input_layernorm.weight"),
        _one("params/mlp_norm/scale", "post_attention_layernorm.weight"),
        *_swiglu("params/mlp/", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight"),
    ]
    if cfg.attention.mla is not None:
        rules += _mla_rules(cfg, hf.get("rope_interleave", True))
    else:
        rules += _attention_rules(cfg, kind)
    if cfg.moe is not None:
        rules += _moe_rules(kind)
    return {path: (rule, i) for rule in rules for i, path in enumerate(rule.ours)}


def top_rules(tied: bool) -> dict[str, tuple[Rule, int]]:
    """Embedding, final norm and head; a tied HF head is read from the embedding."""
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    rules = [
        _one("params/embedding", "model.embed_tokens.weight"),
        _one("params/final_norm/scale", "model.norm.weight"),
        _one("params/head/kernel", head, lambda w: w.T, lambda k: k.T),
    ]
    return {rule.ours[0]: (rule, 0) for rule in rules}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """Where one of our variables comes from: its rule and its place in `rule.ours`, the
    full paths of all of `rule.ours` in its block, the HF name prefix of each layer, and
    whether it is stacked over a scan axis."""

    rule: Rule
    position: int
    arrays: tuple[tuple[str, ...], ...]
    prefix: Callable[[int | None], str]  # scan index (None: unscanned) -> "model.layers.{i}."
    scanned: bool


def leaf_of(path: tuple[str, ...], cfg: ModelConfig, layers: dict, top: dict) -> Leaf:
    """The `Leaf` of our variable at `path`, e.g. ("params", "decoder", "layers", "attn",
    "query", "kernel")."""
    collection, rest = path[0], path[1:]
    if rest[0] != "decoder":
        key = "/".join(path)
        if key not in top:
            raise ConversionError(f"no HF tensor corresponds to our variable {key}")
        return _leaf(path, *top[key], prefix=lambda _: "", scanned=False)
    segment = rest[1]
    key = "/".join([collection, *path[1 + len(_block(path)):]])
    if key not in layers:
        raise ConversionError(f"no HF tensor corresponds to our variable {'/'.join(path)}")
    scanned = not segment.startswith("layers_")
    return _leaf(path, *layers[key], scanned=scanned,
                 prefix=lambda i: f"model.layers.{layer_number(cfg, rest[1:], i or 0)}.")


def _leaf(path: tuple[str, ...], rule: Rule, position: int, prefix, scanned: bool) -> Leaf:
    """The `Leaf` of the variable at `path`, whose rule's arrays are its block's siblings."""
    arrays = tuple(_sibling(path, ours) for ours in rule.ours)
    return Leaf(rule, position, arrays, prefix=prefix, scanned=scanned)


def _pieces(leaf: Leaf, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The leading axes of `shape` that index pieces: the scan axis, then the expert axis."""
    return shape[: int(leaf.scanned) + int(leaf.rule.expert)]


def _hf_names(leaf: Leaf, index: tuple[int, ...]) -> list[str]:
    layer = index[0] if leaf.scanned else None
    expert = index[-1] if leaf.rule.expert else None
    return [leaf.prefix(layer) + name.format(x=expert) for name in leaf.rule.hf]


def _hf_shapes(leaf: Leaf, piece_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The shapes the HF tensors of one piece must have, given the piece shapes of all of
    the rule's arrays (e.g. MLA's key_up and value_up, whose head dims may differ)."""
    ours = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in piece_shapes]
    return [x.shape for x in jax.eval_shape(leaf.rule.to_hf, *ours)]


def _read_piece(reader, leaf: Leaf, index: tuple[int, ...], expected: list) -> np.ndarray:
    """Our piece at `index` of the grid, from its HF tensors, whose shapes are checked
    against `expected` first."""
    names = _hf_names(leaf, index)
    for name, want in zip(names, expected):
        got = reader.shape(name)
        if got != want:
            raise ConversionError(f"tensor {name!r} has shape {list(got)}; the model config "
                                  f"needs {list(want)}")
    return leaf.rule.to_ours(*(reader.get(name) for name in names))[leaf.position]


def load_leaf(reader, leaf: Leaf, shapes: dict[tuple[str, ...], tuple[int, ...]],
              sharding) -> jax.Array:
    """Our variable, built straight into `sharding`: each device's shard is assembled from
    the HF tensors of the pieces it covers, one tensor at a time. `shapes` maps the full
    path of each of our variables to its shape."""
    shape = shapes[leaf.arrays[leaf.position]]
    grid = _pieces(leaf, shape)
    piece_shape = shape[len(grid):]
    expected = _hf_shapes(leaf, [shapes[path][len(grid):] for path in leaf.arrays])

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        ranges = [range(*s.indices(n)) for s, n in zip(index, grid)]
        rest = index[len(grid):]
        out = np.empty([len(r) for r in ranges] + [len(range(*s.indices(n)))
                       for s, n in zip(rest, piece_shape)], np.float32)
        for at in np.ndindex(*out.shape[: len(grid)]):
            where = tuple(r[i] for r, i in zip(ranges, at))
            out[at] = _read_piece(reader, leaf, where, expected)[rest]
        return out

    return jax.make_array_from_callback(shape, sharding, shard)


def _block(path: tuple[str, ...]) -> tuple[str, ...]:
    """The part of a variable's path that names its block: (decoder, segment[, block_j]),
    or () at the top level."""
    if path[1] != "decoder":
        return ()
    return path[1:4] if re.fullmatch(r"block_\d+", path[3]) else path[1:3]


def _sibling(path: tuple[str, ...], ours: str) -> tuple[str, ...]:
    """The full path of the rule's array `ours` in the block of the variable at `path`."""
    collection, *inner = ours.split("/")
    return (collection, *_block(path), *inner)


@jax.jit
def _piece(x: jax.Array, index: tuple) -> jax.Array:
    """x[index], with the index traced: one compilation per variable shape."""
    return x[index]


def hf_tensors(variables: dict, cfg: ModelConfig, layers: dict, top: dict
               ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) of every HF tensor our `variables` make. Only the pieces (one
    layer, one expert) of one rule are on the host at a time."""
    flat = {tuple(k.key for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
    done = set()
    for path, value in flat.items():
        leaf = leaf_of(path, cfg, layers, top)
        grid = _pieces(leaf, value.shape)
        if set(_hf_names(leaf, (0,) * len(grid))) <= done:
            continue
        arrays = [flat[array] for array in leaf.arrays]
        for index in np.ndindex(*grid):
            names = _hf_names(leaf, index)
            done.update(names)
            pieces = [np.asarray(_piece(x, index)) for x in arrays]
            for name, array in zip(names, leaf.rule.to_hf(*pieces)):
                yield name, np.asarray(array, np.float32)
