"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) of an `Einsum` kernel.

A kernel W of shape (*in, *out), `in` the axes contracted with the input, gets A [*in, r]
and B [r, *out]: y = x W + (alpha / r) (x A) B. A starts small and random and B at zero, so
a fresh adapter leaves the layer's output unchanged. In the params tree an adapter sits
beside its kernel as `lora/a` and `lora/b` (under `nn.scan` with the leading layers axis).
"""

import string

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxllm.config import LoRAConfig

SCOPE = "lora"  # the adapter's module name in its kernel's scope


def for_target(lora: LoRAConfig | None, target: str) -> LoRAConfig | None:
    """`lora` (an active one, or None) if it adapts the projection group `target` (q, k, v,
    o, mlp), else None."""
    if lora is None or target not in lora.target_set:
        return None
    return lora


def _equations(equation: str, num_in: int) -> tuple[str, str]:
    """The two einsums of the adapter path of `equation` (input, kernel -> output) whose
    kernel's first `num_in` axes are contracted: x, A -> x A and x A, B -> output."""
    inputs, out = equation.split("->")
    x, kernel = inputs.split(",")
    r = next(c for c in string.ascii_letters if c not in equation)
    batch = "".join(c for c in x if c not in kernel)
    return (f"{x},{kernel[:num_in]}{r}->{batch}{r}",
            f"{batch}{r},{r}{kernel[num_in:]}->{out}")


class Adapter(nn.Module):
    """(alpha / r) (x A) B for a kernel of `shape` whose first `num_in` axes `equation`
    contracts with x. A and B keep the kernel's logical axes on their kernel sides; the
    rank axis is not sharded.

    Its own module (`lora` in the kernel's scope), so that the kernel draws the same init
    key with or without an adapter.
    """

    lora: LoRAConfig
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    equation: str
    num_in: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, r = self.num_in, self.lora.rank
        a_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                  in_axis=tuple(range(n)), out_axis=-1)
        a = self.param("a", nn.with_logical_partitioning(a_init, (*self.axes[:n], None)),
                       (*self.shape[:n], r))
        b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                         (None, *self.axes[n:])),
                       (r, *self.shape[n:]))
        down, up = _equations(self.equation, n)
        h = jnp.einsum(down, x, a.astype(self.dtype))
        return jnp.einsum(up, h, b.astype(self.dtype)) * jnp.asarray(self.lora.scale, self.dtype)


def _is_adapter(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[-2] == SCOPE


def split(params) -> tuple[dict, dict]:
    """(adapters, base): the adapter leaves of `params` and the rest, as two trees."""
    flat = traverse_util.flatten_dict(params)
    adapters = {k: v for k, v in flat.items() if _is_adapter(k)}
    base = {k: v for k, v in flat.items() if not _is_adapter(k)}
    return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(base)


def join(*trees) -> dict:
    """The params tree holding every leaf of `trees` (e.g. `split`'s two parts)."""
    flat = {}
    for tree in trees:
        flat.update(traverse_util.flatten_dict(tree))
    return traverse_util.unflatten_dict(flat)


def identity(adapters) -> dict:
    """`adapters` (a `split` part) with every B zero: adapters that change nothing."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0 if path[-1].key == "b" else x, adapters)


def _product(a: jax.Array, b: jax.Array, kernel_ndim: int) -> jax.Array:
    """A B contracted over the rank, keeping the leading axes (a scanned stack's layers)
    that A, B and the kernel share."""
    lead = a.ndim + b.ndim - 2 - kernel_ndim
    letters = iter(string.ascii_letters)
    shared = "".join(next(letters) for _ in range(lead))
    ins = "".join(next(letters) for _ in range(a.ndim - 1 - lead))
    outs = "".join(next(letters) for _ in range(b.ndim - 1 - lead))
    r = next(letters)
    return jnp.einsum(f"{shared}{ins}{r},{shared}{r}{outs}->{shared}{ins}{outs}", a, b)


def merge(params, lora: LoRAConfig) -> dict:
    """`params` with every adapter folded into its kernel, W + (alpha / r) A B, in float32:
    the params tree of the same model without LoRA."""
    adapters, base = split(params)
    flat, adapters = traverse_util.flatten_dict(base), traverse_util.flatten_dict(adapters)
    for path in {k[:-2] for k in adapters}:
        kernel = flat[(*path, "kernel")]
        a, b = adapters[(*path, SCOPE, "a")], adapters[(*path, SCOPE, "b")]
        flat[(*path, "kernel")] = kernel + lora.scale * _product(a, b, kernel.ndim)
    return traverse_util.unflatten_dict(flat)
