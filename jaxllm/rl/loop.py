"""The GRPO phase: sample G completions per prompt, score them, update the policy, repeat.

Each RL step takes `train.batch_size // grpo.group_size` problems of the reasoning corpus's
train split (in a fixed order, so a resumed run sees the same problems), samples
`group_size` completions of each, scores them with the verifiers, and takes
`grpo.num_iterations` optimizer steps on the GRPO loss of that rollout.
"""

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.data import tasks
from jaxllm.data.readers import reasoning_problems
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.infer import Sampler
from jaxllm.nn import Transformer
from jaxllm.rl import loss as loss_lib
from jaxllm.rl import rewards as rewards_lib
from jaxllm.rl.evaluate import evaluate
from jaxllm.rl.rollout import Rollout, prompt_tokens, rollout
from jaxllm.rl.step import batch_shardings, jit_grpo_step, jit_logprobs
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.checkpoint import checkpointer
from jaxllm.train.metrics import MetricsWriter
from jaxllm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxllm.train.preemption import stop_on_sigterm
from jaxllm.train.progress import Progress
from jaxllm.train.run import restore_weights
from jaxllm.train.state import TrainState, init_state


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


def load_pretrained(workdir: str, state: TrainState, config: config_lib.Config, tx) -> TrainState:
    """`state` with the params (and MoE biases) of the latest checkpoint in `workdir`, a fresh
    optimizer state and step 0. The checkpoint's model must equal `config.model`."""
    restored = restore_weights(workdir, state, config)
    shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
    opt_state = jax.jit(tx.init, out_shardings=shardings)
    return restored.replace(
        step=jnp.zeros_like(restored.step), opt_state=opt_state(restored.params)
    )


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
    return metrics


def format_line(record: dict, total_steps: int) -> str:
    """One RL step's log line: rewards, completion length, KL, clipping and timings."""
    per_function = "".join(
        f" | {key.removeprefix('reward/')} {value:.3f}" for key, value in record.items()
        if key.startswith("reward/") and not key.endswith(("_std", "_failures"))
    )
    held_out = ""
    if "eval/accuracy" in record:
        held_out = f" | held-out accuracy {record['eval/accuracy']:.3f}"
    return (
        f"step {record['step']:>5}/{total_steps} | reward {record['reward']:.3f}{per_function} "
        f"| len {record['completion_length']:.1f} | kl {record.get('kl', 0.0):.4f} "
        f"| clip {record.get('clip_fraction', 0.0):.3f}{held_out} "
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
    On SIGTERM, or after step `stop_after`, it saves at the step it reached and returns.

    `reward_fns` (TRL/Tunix interface, summed with `weights`) default to the verifiers'
    accuracy reward and the configured format reward; `problems` default to the reasoning
    corpus's train split.
    """
    config = config_lib.validate(config)
    cfg, rl = config.train, config.grpo
    if rl is None:
        raise config_lib.ConfigError("grpo: the experiment sets no GRPOConfig")
    mesh = parallel.make_mesh(config)
    model = Transformer(config.model)
    tx = make_optimizer(cfg)
    tokenizer = load_tokenizer(config.data.tokenizer)
    problems = problems or reasoning_problems(config.data, "train")
    eval_problems = (
        reasoning_problems(config.data, "validation")[: rl.eval_problems] if rl.eval_every else []
    )
    prompt_len = max(len(prompt_tokens(p, tokenizer)) for p in problems + eval_problems)
    seq_len = prompt_len + rl.max_completion_len
    state, shardings = init_state(model, tx, seq_len, mesh, jax.random.key(cfg.seed))

    checkpoints = checkpointer(config)
    start = 0
    if checkpoints is not None and checkpoints.latest_step() is not None:
        state, start = checkpoints.resume(state, config)
        log(f"resumed from the checkpoint at RL step {start} in {checkpoints.directory}")
    elif config.init_from is not None:
        state = load_pretrained(config.init_from, state, config, tx)
        log(f"starting from the weights in {config.init_from}")
    if config.workdir:
        workdir_lib.save_config(config, config.workdir)

    with parallel.use_mesh(mesh):
        step_fn = jit_grpo_step(model, tx, rl, learning_rate_schedule(cfg), mesh, shardings)
        logprob_fn = jit_logprobs(model, mesh, shardings)
        ref = (state.params, state.moe_bias) if rl.beta > 0 else None
        if ref is not None:
            ref = jax.tree.map(jnp.copy, ref)
    device_batch = batch_shardings(mesh, rl)
    if reward_fns is None:
        reward_fns, weights = reward_functions(rl)
    prompts_per_step = cfg.batch_size // rl.group_size
    writer = MetricsWriter(config.workdir, start)
    progress = Progress(cfg.steps, start, log)
    samples_log = None
    if config.workdir and jax.process_index() == 0:  # a remote run's earlier samples first
        samples_log = workdir_lib.pull(config.workdir, "samples.txt")
    history = []
    with parallel.use_mesh(mesh), stop_on_sigterm() as sigterm:
        try:
            for step in range(start + 1, cfg.steps + 1):
                rng = jax.random.fold_in(jax.random.key(cfg.seed), step)
                chosen = problems_of_step(problems, step, prompts_per_step)
                sampler = Sampler(model, state.params, tokenizer, moe_bias=state.moe_bias)
                began = time.perf_counter()
                ro = rollout(sampler, chosen, group_size=rl.group_size,
                             max_new_tokens=rl.max_completion_len, temperature=rl.temperature,
                             rng=rng, prompt_len=prompt_len)
                rollout_s = time.perf_counter() - began
                columns = _columns(chosen, rl.group_size)
                rewards = rewards_lib.score(reward_fns, ro.prompts, ro.completions, weights,
                                            **columns)
                total = rewards.total
                if rl.overlong_buffer:
                    total = total + np.asarray(loss_lib.overlong_penalty(
                        ro.lengths, rl.max_completion_len, rl.overlong_buffer))
                advantages = np.asarray(loss_lib.group_advantages(
                    total, rl.group_size, rl.scale_rewards))
                keep = (np.asarray(loss_lib.informative_groups(total, rl.group_size))
                        if rl.dynamic_sampling else np.ones(len(total), bool))
                batch = jax.device_put(_batch(ro, advantages, keep),
                                       {k: device_batch[k] for k in ("tokens", "positions",
                                        "segment_ids", "completion_mask", "advantages")})
                began = time.perf_counter()
                args = (batch["tokens"], batch["positions"], batch["segment_ids"])
                if rl.num_iterations > 1:
                    batch["old_logprobs"] = logprob_fn(state.params, state.moe_bias, *args)
                if ref is not None:
                    batch["ref_logprobs"] = logprob_fn(*ref, *args)
                for _ in range(rl.num_iterations):
                    state, metrics = step_fn(state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                record = {
                    "step": step, **_rollout_metrics(ro, rewards, total, keep), **metrics,
                    "rollout_s": rollout_s, "update_s": time.perf_counter() - began,
                }
                preempted = sigterm.is_set()
                stopping = preempted or step == stop_after
                final = stopping or step == cfg.steps
                if rl.eval_every and (step % rl.eval_every == 0 or final):
                    sampler = Sampler(model, state.params, tokenizer, moe_bias=state.moe_bias)
                    accuracy = evaluate(sampler, eval_problems, rng=jax.random.key(0),
                                        temperature=rl.temperature,
                                        max_new_tokens=rl.max_completion_len)
                    record.update({f"eval/{k}": v for k, v in accuracy.items()})
                    _write_samples(samples_log, step, ro)
                writer.write(record)  # also copies the samples log to a remote workdir
                history.append(record)
                if step == start + 1 or step % cfg.log_every == 0 or final:
                    progress.write(format_line(record, cfg.steps))
                progress.advance(step)
                if checkpoints is not None:
                    checkpoints.save(step, state, config, force=final)
                if stopping:
                    progress.write(f"stopped at RL step {step}")
                    break
        finally:
            progress.close()
            writer.close()
            if checkpoints is not None:
                checkpoints.close()
    return history


def _columns(problems: list[tasks.Problem], group_size: int) -> dict[str, list]:
    """The dataset columns reward functions receive, one entry per completion."""
    repeated = [p for p in problems for _ in range(group_size)]
    return {
        "family": [p.family for p in repeated],
        "answer": [p.answer for p in repeated],
        "numbers": [p.numbers for p in repeated],
        "target": [p.target for p in repeated],
    }


def _write_samples(path: Path | None, step: int, ro: Rollout, count: int = 4) -> None:
    """Appends a few prompts and their completions to the run's samples log (in the local
    mirror of a remote workdir, which the next `MetricsWriter.write` copies)."""
    if path is None or jax.process_index() != 0:
        return
    with open(path, "a") as f:
        for prompt, completion in list(zip(ro.prompts, ro.completions))[:count]:
            f.write(f"--- step {step}\n{prompt}{completion}\n")
