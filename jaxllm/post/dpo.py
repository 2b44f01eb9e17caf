"""The DPO phase: preference pairs, a frozen reference, one DPO update per step.

Each step takes `train.batch_size // 2` pairs of `dpo.paths` (epoch after epoch, each epoch
in its own order seeded by `data.seed`, so a resumed run sees the same pairs), lays them out
as chosen and rejected rows of one batch, and takes one optimizer step on the DPO loss.
Every `dpo.eval_every` steps, and at the last, the pairs of `dpo.eval_paths` are scored.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import config as config_lib
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer
from jaxllm.infer.sampler import to_host
from jaxllm.post import preferences
from jaxllm.post import reference as reference_lib
from jaxllm.post.dpo_loss import dpo_loss
from jaxllm.post.dpo_step import batch_shardings, jit_dpo_step, jit_response_logps
from jaxllm.post.preferences import TokenizedPair
from jaxllm.train.optimizer import learning_rate_schedule
from jaxllm.train.scaffold import Run, initial_weights, run_phase
from jaxllm.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class _Data:
    """The tokenized pairs of each split ("train", and "eval" when given)."""

    tokenizer: Tokenizer
    splits: dict[str, list[TokenizedPair]]


def dpo(config: config_lib.Config, log: Callable[[str], None] = print,
        stop_after: int | None = None) -> list[dict]:
    """Runs `config.train.steps` DPO steps; returns the logged records.

    The policy, and the reference, start from the latest checkpoint of `config.init_from`
    unless this run's own workdir holds checkpoints: then the run resumes from those. The
    pairs are read and checked before anything is written. On SIGTERM, or after step
    `stop_after`, the run saves at the step it reached and returns.
    """
    config = config_lib.validate(config)
    if config.dpo is None:
        raise config_lib.ConfigError("dpo: the experiment sets no DPOConfig")
    data = _read_data(config)
    return run_phase(config, build=functools.partial(_DPOStep, data=data),
                     seq_len=config.train.seq_len, log=log, stop_after=stop_after)


def _read_data(config: config_lib.Config) -> _Data:
    """The tokenizer and the tokenized pairs, checked against the model and the row width."""
    try:
        tokenizer = load_tokenizer(config.data.tokenizer)
    except (ValueError, OSError) as error:
        raise config_lib.ConfigError(f"data.tokenizer: {error}") from None
    if tokenizer.vocab_size > config.model.vocab_size:
        raise config_lib.ConfigError(
            f"model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens")
    files = {"train": ("dpo.paths", config.dpo.paths)}
    if config.dpo.eval_paths:
        files["eval"] = ("dpo.eval_paths", config.dpo.eval_paths)
    splits = {
        name: [preferences.tokenize(pair, tokenizer, config.train.seq_len)
               for pair in preferences.read_pairs(paths, field)]
        for name, (field, paths) in files.items()
    }
    return _Data(tokenizer=tokenizer, splits=splits)


def pair_indices(step: int, count: int, total: int, seed: int) -> np.ndarray:
    """The indices of the `count` pairs of step `step` (1-based) among `total`: epoch after
    epoch, epoch e in the order of a permutation seeded by (seed, e)."""
    positions = np.arange((step - 1) * count, step * count)
    orders = {e: np.random.default_rng((seed, int(e))).permutation(total)
              for e in np.unique(positions // total)}
    return np.array([orders[p // total][p % total] for p in positions])


def _chunks(total: int, size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(indices, kept) for batches of `size` pairs covering all `total` in order: the last
    one filled up with pairs from the start, of which only the first `kept` count."""
    for first in range(0, total, size):
        yield np.arange(first, first + size) % total, min(size, total - first)


def format_line(record: dict, total_steps: int) -> str:
    """One DPO step's log line: loss, reward margin and accuracy, held-out accuracy."""
    held_out = ""
    if "eval/rewards/accuracies" in record:
        held_out = f" | held-out accuracy {record['eval/rewards/accuracies']:.3f}"
    return (
        f"step {record['step']:>5}/{total_steps} | loss {record['loss']:.4f} "
        f"| margin {record['rewards/margins']:.4f} | accuracy {record['rewards/accuracies']:.3f}"
        f"{held_out} | {record['step_s']:.2f} s"
    )


class _DPOStep:
    """DPO's step: the step's pairs, their reference log-probs, one update (and a held-out
    evaluation now and then)."""

    def __init__(self, run: Run, data: _Data):
        self.run, self.data, cfg = run, data, run.config
        self.pairs_per_step = cfg.train.batch_size // 2
        self.update = jit_dpo_step(run.model, run.tx, cfg.dpo,
                                   learning_rate_schedule(cfg.train), run.mesh, run.shardings)
        self.logps = jit_response_logps(run.model, run.mesh, run.shardings)
        self.shardings = batch_shardings(run.mesh)
        self.reference = self._reference()

    def __call__(self, state: TrainState, number: int, *, final: bool
                 ) -> tuple[TrainState, dict]:
        cfg = self.run.config
        indices = pair_indices(number, self.pairs_per_step, len(self.data.splits["train"]),
                               cfg.data.seed)
        rows = self._device_rows(self._rows("train", indices))
        batch = {**rows, "ref_logps": self.reference("train", indices, rows)}
        began = time.perf_counter()
        state, metrics = self.update(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        record = {"step": number, **metrics, "step_s": time.perf_counter() - began}
        every = cfg.dpo.eval_every
        if "eval" in self.data.splits and (final or (every and number % every == 0)):
            record.update(self._evaluate(state))
        self.run.writer.write(record)
        if number == self.run.start + 1 or number % cfg.train.log_every == 0 or final:
            self.run.progress.write(format_line(record, cfg.train.steps))
        return state, record

    def _rows(self, split: str, indices: np.ndarray) -> dict[str, np.ndarray]:
        pairs = [self.data.splits[split][i] for i in indices]
        return preferences.batch(pairs, self.run.config.train.seq_len,
                                 self.data.tokenizer.pad_id)

    def _device_rows(self, rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return jax.device_put(rows, {k: self.shardings[k] for k in rows})

    def _reference(self) -> Callable[[str, np.ndarray, dict], jax.Array]:
        """(split, pair indices, their rows on the devices) -> the reference's [2P] log-probs
        of the rows, on the devices: computed from the frozen weights, or read from the
        cache."""
        if self.run.config.dpo.reference == "batch":
            weights = initial_weights(self.run)
            return lambda split, indices, rows: self.logps(*weights, rows)
        table = self._cached_table()
        return lambda split, indices, rows: jax.device_put(
            table[split][indices].T.reshape(-1), self.shardings["ref_logps"])

    def _cached_table(self) -> dict[str, np.ndarray]:
        """The reference's [N, 2] (chosen, rejected) log-probs of every pair of each split:
        read back on resume, else computed and written to the workdir."""
        workdir = self.run.config.workdir
        key = reference_lib.fingerprint(self.data.splits, self.run)
        table = reference_lib.load(workdir, key) if self.run.start else None
        if table is None:
            weights = initial_weights(self.run)
            table = {split: self._score(split, weights) for split in self.data.splits}
            reference_lib.save(workdir, table, key)
        return table

    def _score(self, split: str, weights) -> np.ndarray:
        """[N, 2] summed response log-probs of every pair of `split` under `weights`."""
        size, scores = self.pairs_per_step, []
        for indices, kept in _chunks(len(self.data.splits[split]), size):
            logps = self.logps(*weights, self._device_rows(self._rows(split, indices)))
            scores.append(to_host(logps).reshape(2, size).T[:kept])
        return np.concatenate(scores)

    def _evaluate(self, state: TrainState) -> dict[str, float]:
        """The DPO metrics over all held-out pairs, as `eval/...`."""
        size, policy, ref, lengths = self.pairs_per_step, [], [], []
        for indices, kept in _chunks(len(self.data.splits["eval"]), size):
            rows = self._rows("eval", indices)
            on_devices = self._device_rows(rows)
            logps = self.logps(state.params, state.moe_bias, on_devices)
            policy.append(to_host(logps).reshape(2, size)[:, :kept])
            ref_logps = self.reference("eval", indices, on_devices)
            ref.append(to_host(ref_logps).reshape(2, size)[:, :kept])
            lengths.append(rows["response_mask"].sum(-1).reshape(2, size)[:, :kept])
        policy, ref, lengths = (jnp.asarray(np.concatenate(x, 1).reshape(-1))
                                for x in (policy, ref, lengths))
        _, metrics = dpo_loss(policy, ref, lengths, self.run.config.dpo)
        return {f"eval/{k}": float(v) for k, v in metrics.items()}
