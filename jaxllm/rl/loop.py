"""The GRPO phase: sample G completions per prompt, score them, update the policy, repeat.

Each RL step takes `train.batch_size // grpo.group_size` problems of the reasoning corpus's
train split, or with `data.source=images` of the image corpus's (of `grpo.families`, in a fixed
order, so a resumed run sees the same problems), samples
`group_size` completions of each, scores them with the verifiers, and takes
`grpo.num_iterations` optimizer steps on the GRPO loss of that rollout.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from jaxllm import config as config_lib
from jaxllm import tools
from jaxllm.data import tasks
from jaxllm.data.image_readers import corpus_problems
from jaxllm.data.readers import reasoning_problems
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer
from jaxllm.infer import EFFORTS, Sampler
from jaxllm.rl import effort as rl_effort
from jaxllm.rl import loss as loss_lib
from jaxllm.rl import rewards as rewards_lib
from jaxllm.rl import visual
from jaxllm.rl.evaluate import evaluate
from jaxllm.rl.rollout import Rollout, prompt_tokens, rollout, rollout_sampler
from jaxllm.rl.step import batch_shardings, jit_grpo_step, jit_logprobs
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.optimizer import learning_rate_schedule
from jaxllm.train.scaffold import Run, initial_weights, run_phase
from jaxllm.train.state import TrainState


def reward_functions(cfg: config_lib.GRPOConfig) -> tuple[list, list[float]]:
    """The accuracy reward, plus the format reward when it has a weight."""
    fns, weights = [rewards_lib.accuracy_reward], [1.0]
    if cfg.format_reward:
        fns.append(rewards_lib.format_reward)
        weights.append(cfg.format_reward)
    return fns, weights


def problems_of_step(problems: list[tasks.Problem], step: int, count: int) -> list[tasks.Problem]:
    """The `count` problems of RL step `step` (1-based), cycling through `problems` in order."""
    first = (step - 1) * count
    return [problems[(first + i) % len(problems)] for i in range(count)]


def _batch(ro: Rollout, advantages: np.ndarray, keep: np.ndarray) -> dict[str, np.ndarray]:
    batch = ro.batch()
    batch["completion_mask"] = batch["completion_mask"] * keep[:, None].astype(np.int32)
    batch["advantages"] = advantages.astype(np.float32)
    return batch


def _rollout_metrics(ro: Rollout, rewards: rewards_lib.Rewards, total: np.ndarray,
                     keep: np.ndarray) -> dict[str, float]:
    metrics = {"reward": float(total.mean()), "reward_std": float(total.std())}
    for name, scores in rewards.per_function.items():
        metrics[f"reward/{name}"] = float(scores.mean())
        metrics[f"reward/{name}_std"] = float(scores.std())
        metrics[f"reward/{name}_failures"] = float(rewards.failures[name])
    metrics["completion_length"] = float(ro.lengths.mean())
    metrics["groups_dropped"] = float(1.0 - keep.mean())
    metrics.update(ro.tool_metrics)
    return metrics


def format_line(record: dict, total_steps: int) -> str:
    """One RL step's log line: rewards, completion length, KL, clipping, thinking tokens per
    effort level and timings."""
    per_function = "".join(
        f" | {key.removeprefix('reward/')} {value:.3f}" for key, value in record.items()
        if key.startswith("reward/") and not key.endswith(("_std", "_failures"))
    )
    thinking = "".join(
        f" {key.split('/')[1]} {value:.1f}" for key, value in record.items()
        if key.startswith("effort/") and key.endswith("/thinking_tokens")
    )
    thinking = f" | thinking{thinking}" if thinking else ""
    held_out = ""
    if "eval/accuracy" in record:
        held_out = f" | held-out accuracy {record['eval/accuracy']:.3f}"
    tools = ""
    if "tools/calls" in record:
        tools = f" | tool calls {record['tools/calls']:.2f} ({record['tools/errors']:.2f} errors)"
    return (
        f"step {record['step']:>5}/{total_steps} | reward {record['reward']:.3f}{per_function} "
        f"| len {record['completion_length']:.1f}{tools} | kl {record.get('kl', 0.0):.4f} "
        f"| clip {record.get('clip_fraction', 0.0):.3f} "
        f"| sampler kl {record.get('offpolicy/kl', 0.0):.2e} "
        f"w {record.get('offpolicy/weight_mean', 1.0):.3f} "
        f"capped {record.get('offpolicy/capped_fraction', 0.0):.3f}{thinking}{held_out} "
        f"| rollout {record['rollout_s']:.2f} s | update {record['update_s']:.2f} s"
    )


def grpo(
    config: config_lib.Config,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
    reward_fns: Sequence[rewards_lib.RewardFunction] | None = None,
    weights: Sequence[float] | None = None,
    problems: list[tasks.Problem] | None = None,
) -> list[dict]:
    """Runs `config.train.steps` GRPO steps; returns the logged records.

    The policy starts from the latest checkpoint of `config.init_from` (a pretraining
    workdir), unless this run's own workdir holds checkpoints: then it resumes from those.
    On SIGTERM (in a multi-host run: at the step the hosts agree on after a preemption
    notice), or after step `stop_after`, it saves at the step it reached and returns.

    `reward_fns` (TRL/Tunix interface, summed with `weights`) default to the verifiers'
    accuracy reward and the configured format reward; `problems` default to the train split
    of the reasoning corpus, or of the image corpus with `data.source=images`; image
    problems carry their pictures through rollouts and updates.
    """
    config = config_lib.validate(config)
    rl = config.grpo
    if rl is None:
        raise config_lib.ConfigError("grpo: the experiment sets no GRPOConfig")
    tokenizer = load_tokenizer(config.data.tokenizer)
    problems = problems or rl_problems(config, "train")
    eval_problems = rl_problems(config, "validation")[: rl.eval_problems] if rl.eval_every else []
    level = rl.effort_levels[0] if rl.effort_levels else None  # control tokens: one token each
    patch_size = config.model.vision.patch_size
    prompt_len = max(len(prompt_tokens(p, tokenizer, level, patch_size=patch_size))
                     for p in problems + eval_problems)
    if reward_fns is None:
        reward_fns, weights = reward_functions(rl)
    task = _Task(tokenizer=tokenizer, problems=problems, eval_problems=eval_problems,
                 prompt_len=prompt_len, reward_fns=reward_fns, weights=weights,
                 images=visual.is_image(problems[0]))
    return run_phase(config, build=functools.partial(_GRPOStep, task=task),
                     seq_len=prompt_len + rl.max_completion_len, unit="RL step", log=log,
                     stop_after=stop_after)


@dataclasses.dataclass(frozen=True)
class _Task:
    """What GRPO samples and scores: the problems, their tokenizer and the rewards."""

    tokenizer: Tokenizer
    problems: list[tasks.Problem]
    eval_problems: list[tasks.Problem]
    prompt_len: int
    reward_fns: Sequence[rewards_lib.RewardFunction]
    weights: Sequence[float] | None
    images: bool  # image problems: batches carry their prompts' patches


class _GRPOStep:
    """GRPO's step: rollout, reward, update (and a held-out evaluation now and then)."""

    def __init__(self, run: Run, task: _Task):
        self.run, self.task, rl = run, task, run.config.grpo
        self.update = jit_grpo_step(run.model, run.tx, rl,
                                    learning_rate_schedule(run.config.train), run.mesh,
                                    run.shardings, images=task.images)
        self.logprobs = jit_logprobs(run.model, run.mesh, run.shardings, images=task.images,
                                     temperature=rl.temperature)
        self.ref = initial_weights(run) if rl.beta > 0 else None  # the KL's reference
        self.device_batch = batch_shardings(run.mesh, rl, images=task.images)
        self.toolbox = tools.toolbox(rl.tool_names) if rl.tool_names else None
        self.samples_log = None
        if run.config.workdir and jax.process_index() == 0:  # a remote run's samples first
            self.samples_log = workdir_lib.pull(run.config.workdir, "samples.txt")

    def __call__(self, state: TrainState, number: int, *, final: bool
                 ) -> tuple[TrainState, dict]:
        cfg, rl = self.run.config.train, self.run.config.grpo
        chosen = problems_of_step(self.task.problems, number, cfg.batch_size // rl.group_size)
        began = time.perf_counter()
        ro = rollout(self._sampler(state), chosen, group_size=rl.group_size,
                     max_new_tokens=rl.max_completion_len, temperature=rl.temperature,
                     rng=jax.random.fold_in(jax.random.key(cfg.seed), number),
                     prompt_len=self.task.prompt_len,
                     efforts=rl_effort.efforts_of_step(rl, number, len(chosen)))
        rollout_s = time.perf_counter() - began
        rewards, total, keep = self._score(ro, chosen)
        began = time.perf_counter()
        state, metrics = self._update(state, ro, total=total, keep=keep)
        record = {
            "step": number, **_rollout_metrics(ro, rewards, total, keep), **metrics,
            "rollout_s": rollout_s, "update_s": time.perf_counter() - began,
        }
        if ro.efforts is not None:
            record.update(rl_effort.metrics(ro, total, rewards.per_function, self._close_id))
        if rl.eval_every and (number % rl.eval_every == 0 or final):
            record.update(self._evaluate(state))
            _write_samples(self.samples_log, number, ro)
        self.run.writer.write(record)  # also copies the samples log to a remote workdir
        if number == self.run.start + 1 or number % cfg.log_every == 0 or final:
            self.run.progress.write(format_line(record, cfg.steps))
        return state, record

    def _score(self, ro: Rollout, chosen: list[tasks.Problem]
               ) -> tuple[rewards_lib.Rewards, np.ndarray, np.ndarray]:
        """The rewards, their total with any overlong penalty, and which rows to keep."""
        rl = self.run.config.grpo
        rewards = rewards_lib.score(self.task.reward_fns, ro.prompts, ro.completions,
                                    self.task.weights, **_columns(chosen, rl.group_size))
        total = rewards.total
        if ro.efforts is not None and rl.length_penalty:
            total = total + rl_effort.rollout_length_reward(ro, total, rl, self._close_id)
        if rl.overlong_buffer:
            total = total + np.asarray(loss_lib.overlong_penalty(
                ro.lengths, rl.max_completion_len, rl.overlong_buffer))
        keep = (np.asarray(loss_lib.informative_groups(total, rl.group_size))
                if rl.dynamic_sampling else np.ones(len(total), bool))
        return rewards, total, keep

    def _evaluate(self, state: TrainState) -> dict[str, float]:
        """Held-out accuracy, as `eval/...` metrics."""
        rl = self.run.config.grpo
        accuracy = evaluate(self._sampler(state), self.task.eval_problems, rng=jax.random.key(0),
                            temperature=rl.temperature, max_new_tokens=rl.max_completion_len)
        return {f"eval/{k}": v for k, v in accuracy.items()}

    def _sampler(self, state: TrainState) -> Sampler:
        """A sampler of the current policy, in `grpo.rollout_dtype`, with the effort levels'
        budgets; with `grpo.tools`, one that lets the model call them."""
        rl = self.run.config.grpo
        return rollout_sampler(self.run.model, state.params, self.task.tokenizer,
                               moe_bias=state.moe_bias, dtype=rl.rollout_dtype,
                               toolbox=self.toolbox, max_tool_calls=rl.max_tool_calls,
                               efforts={**EFFORTS, **rl_effort.levels(rl)})

    @property
    def _close_id(self) -> int:
        return self.task.tokenizer.special["</think>"]

    def _update(self, state: TrainState, ro: Rollout, *, total: np.ndarray, keep: np.ndarray
                ) -> tuple[TrainState, dict[str, float]]:
        """`num_iterations` optimizer steps on the GRPO loss of the rollout."""
        rl = self.run.config.grpo
        advantages = np.asarray(loss_lib.group_advantages(total, rl.group_size, rl.scale_rewards))
        names = ("tokens", "positions", "segment_ids", "completion_mask", "advantages",
                 "sampler_logprobs") + (("patches",) if self.task.images else ())
        batch = jax.device_put(_batch(ro, advantages, keep),
                               {k: self.device_batch[k] for k in names})
        args = (batch["tokens"], batch["positions"], batch["segment_ids"])
        args += (batch["patches"],) if self.task.images else ()
        if rl.num_iterations > 1:
            batch["old_logprobs"] = self.logprobs(state.params, state.moe_bias, *args)
        if self.ref is not None:
            batch["ref_logprobs"] = self.logprobs(*self.ref, *args)
        for _ in range(rl.num_iterations):
            state, metrics = self.update(state, batch)
        return state, {k: float(v) for k, v in jax.device_get(metrics).items()}


def task_problems(config: config_lib.Config, split: str) -> list:
    """The problems of `split` of the reasoning corpus, or of the image corpus with
    `data.source=images` (at `model.vision.image_size`), in order."""
    if config.data.source != "images":
        return reasoning_problems(config.data, split)
    if config.model.vision.image_size == 0:
        raise config_lib.ConfigError("model.vision.image_size: image problems need a vision "
                                     "model; set the image size")
    return corpus_problems(config.data, split, image_size=config.model.vision.image_size)


def rl_problems(config: config_lib.Config, split: str) -> list:
    """`task_problems` of the families `grpo.families` (all if empty)."""
    problems, wanted = task_problems(config, split), config.grpo.family_names
    if unknown := sorted(set(wanted) - {p.family for p in problems}):
        raise config_lib.ConfigError(
            f"grpo.families: {split!r} of data.source={config.data.source} has no problems of "
            f"{unknown}; it has {sorted({p.family for p in problems})}")
    return [p for p in problems if not wanted or p.family in wanted]


def _columns(problems: list[tasks.Problem], group_size: int) -> dict[str, list]:
    """The dataset columns reward functions receive, one entry per completion."""
    repeated = [p for p in problems for _ in range(group_size)]
    return {
        "family": [p.family for p in repeated],
        "answer": [p.answer for p in repeated],
        "numbers": [getattr(p, "numbers", None) for p in repeated],
        "target": [getattr(p, "target", None) for p in repeated],
    }


def _write_samples(path: Path | None, step: int, ro: Rollout, count: int = 4) -> None:
    """Appends a few prompts and their completions to the run's samples log (in the local
    mirror of a remote workdir, which the next `MetricsWriter.write` copies)."""
    if path is None or jax.process_index() != 0:
        return
    with open(path, "a") as f:
        for prompt, completion in list(zip(ro.prompts, ro.completions))[:count]:
            f.write(f"--- step {step}\n{prompt}{completion}\n")
