"""Effort-conditioned GRPO on the demo's model (docs/rl.md, "Effort-conditioned GRPO").

Pretraining on effort documents (`data.effort_documents`) teaches the control tokens; GRPO
then samples each group at its prompt's effort, budget-forced, with the length reward. Run
as a script, it does both and sweeps the control tokens unforced before and after GRPO:

    python experiments/tiny_effort.py runs/tiny_effort   # control.md and control.png there
    jaxllm grpo experiments/tiny_effort.py init_from=runs/tiny_effort/pretrain  # GRPO alone
"""

import dataclasses
import json
import sys

import jax

from jaxllm import Config
from jaxllm import config as config_lib
from jaxllm.data.readers import reasoning_problems
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.demo import configs as demo_configs
from jaxllm.infer import Sampler
from jaxllm.rl import sweep
from jaxllm.rl.loop import grpo
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.loop import pretrain
from jaxllm.train.run import load_run

SWEEP_PROBLEMS = 128


def configs(workdir: str) -> tuple[Config, Config]:
    """The pretraining run on effort documents and the effort-conditioned GRPO run."""
    pre, rl = demo_configs(workdir)
    data = dataclasses.replace(pre.data, effort_documents=True)
    pre = dataclasses.replace(pre, data=data)
    rl = dataclasses.replace(
        rl, data=data,
        train=dataclasses.replace(rl.train, steps=200, log_every=10),
        grpo=config_lib.GRPOConfig(
            group_size=8, max_completion_len=48, eval_every=0, efforts="instant,low,medium,high",
            effort_budgets="0,12,20,32", length_penalty=0.5, length_tolerance=0.5,
        ),
        checkpoint=config_lib.CheckpointConfig(every=100),
    )
    return pre, rl


def config() -> Config:
    _, rl = configs("runs/tiny_effort")
    return rl


def control_rows(workdir: str, problems, max_new_tokens: int) -> list[dict]:
    """The unforced control-token sweep of the latest checkpoint in `workdir` (greedy)."""
    run_config, model, state = load_run(workdir)
    sampler = Sampler(model, state.params, load_tokenizer(run_config.data.tokenizer),
                      moe_bias=state.moe_bias)
    return sweep.control_sweep(sampler, problems, levels=config_lib.EFFORT_LEVELS,
                               temperature=0.0, max_new_tokens=max_new_tokens,
                               rng=jax.random.key(0))


def main(workdir: str) -> None:
    pre, rl = configs(workdir)
    pretrain(pre)
    problems = reasoning_problems(rl.data, "test")[:SWEEP_PROBLEMS]
    cap = rl.grpo.max_completion_len
    series = {"pretrained": control_rows(pre.workdir, problems, cap)}
    grpo(rl)
    series["after effort GRPO"] = control_rows(rl.workdir, problems, cap)
    out = workdir_lib.path(workdir)
    summary = "\n\n".join(f"{name}:\n\n{sweep.table(rows)}" for name, rows in series.items())
    workdir_lib.write_text(out / "control.md", summary + "\n")
    workdir_lib.write_text(out / "control.json", json.dumps(series, indent=2) + "\n")
    print(summary)
    print(f"wrote {sweep.control_plot(series, out / 'control.png')}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_effort")
