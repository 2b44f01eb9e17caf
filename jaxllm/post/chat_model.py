"""A run's model as a chat assistant: sampled responses to conversations, and the
probability that it answers a question with one letter rather than another (a judge)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ConfigError, ConstitutionConfig
from jaxllm.data import chat
from jaxllm.data import constitution_prompts as prompts_lib
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.infer import Sampler
from jaxllm.infer.sampler import to_host
from jaxllm.train.run import load_run


class ChatModel:
    """A run's latest model, answering chat messages and judging pairs."""

    def __init__(self, workdir: str, cfg: ConstitutionConfig, seed: int):
        config, model, state = load_run(workdir)
        self.key = jax.random.key(seed)
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        self.sampler = Sampler(model, state.params, self.tokenizer, moe_bias=state.moe_bias)
        self.cfg = cfg
        letters = [self.tokenizer.encode(letter) for letter in prompts_lib.LETTERS]
        if any(len(ids) != 1 for ids in letters):
            raise ConfigError(f"the judge answers with one token, and {workdir}'s tokenizer "
                              f"splits {prompts_lib.LETTERS} into {letters}")
        self.letter_ids = jnp.array([ids[0] for ids in letters])
        self._letter_logits = jax.jit(functools.partial(_last_logits, model))

    def respond(self, conversations: list[list[dict]], rng: jax.Array) -> list[str]:
        """A sampled response to each conversation, without its end token."""
        if not conversations:
            return []
        ids = [chat.generation_prompt(self.tokenizer, m) for m in conversations]
        result = to_host(self.sampler.generate(
            ids, max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
            rng=rng))
        eos = self.tokenizer.eos_id
        return [self.tokenizer.decode([t for t in row[:length] if t != eos])
                for row, length in zip(np.asarray(result.tokens), np.asarray(result.lengths))]

    def rng(self, start: int, draw: int) -> jax.Array:
        """The key of sampling `draw` of the batch that starts at record `start`."""
        return jax.random.fold_in(jax.random.fold_in(self.key, start), draw)

    def prefer_first(self, questions: list[list[dict]]) -> np.ndarray:
        """P(A) against P(B) as the next token after each question's assistant header."""
        rows = [chat.generation_prompt(self.tokenizer, m) for m in questions]
        width = -(-max(map(len, rows)) // 64) * 64
        tokens = np.full((len(rows), width), self.tokenizer.pad_id, np.int32)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = row
        lengths = np.array([len(row) for row in rows])
        logits = self._letter_logits(
            {"params": self.sampler.params, "moe_bias": self.sampler.moe_bias},
            jnp.asarray(tokens), jnp.asarray(lengths), self.letter_ids)
        return np.asarray(jax.nn.softmax(logits, axis=-1)[:, 0])


def _last_logits(model, variables, tokens, lengths, letter_ids):
    """[B, len(letter_ids)] logits of the letters at each row's last real token."""
    column = jnp.arange(tokens.shape[1])
    real = column[None, :] < lengths[:, None]
    positions = jnp.where(real, column[None, :], 0)
    logits, _ = model.apply(variables, tokens, positions, real.astype(jnp.int32),
                            mutable=["moe_metrics"])
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return last[:, letter_ids].astype(jnp.float32)
