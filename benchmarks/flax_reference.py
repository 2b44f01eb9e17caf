"""A plain Flax Linen decoder of the benchmark's shape: the baseline jaxllm's step must match.

Only stock parts: `nn.Embed`, `nn.RMSNorm`, `nn.MultiHeadDotProductAttention` with a causal
mask, `nn.Dense` SwiGLU, an untied `nn.Dense` head, optax's integer-label cross-entropy and
AdamW, all in float32, in one jitted step with the state donated. No RoPE, no scan, no
sharding: the simplest step a Flax user writes.
"""

import flax.linen as nn
import jax
import optax


class Block(nn.Module):
    heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, use_bias=False)(
            nn.RMSNorm()(x), mask=mask
        )
        x = x + h
        h = nn.RMSNorm()(x)
        h = nn.silu(nn.Dense(self.mlp_dim, use_bias=False)(h)) * nn.Dense(
            self.mlp_dim, use_bias=False
        )(h)
        return x + nn.Dense(x.shape[-1], use_bias=False)(h)


class Decoder(nn.Module):
    vocab: int
    embed_dim: int
    layers: int
    heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.embed_dim)(tokens)
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.layers):
            x = Block(self.heads, self.mlp_dim)(x, mask)
        return nn.Dense(self.vocab, use_bias=False)(nn.RMSNorm()(x))


def make_step(model: Decoder, tokens: jax.Array, learning_rate: float = 1e-3):
    """(params, opt_state, the jitted step (params, opt_state, tokens) -> (params, opt_state, loss))."""
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    tx = optax.adamw(learning_rate, weight_decay=0.1)
    opt_state = tx.init(params)

    def loss_fn(params, tokens):
        logits = model.apply(params, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return params, opt_state, jax.jit(step, donate_argnums=(0, 1))
