"""`jaxllm demo`: the whole mission on a CPU in minutes.

1. pretrain a tiny model on the offline reasoning corpus;
2. measure its held-out accuracy on the whole test split;
3. improve it with GRPO, rewarded by the verifiers;
4. measure again;
5. sweep thinking budgets and self-consistency votes on the final model.

Everything lands in the workdir: `pretrain/` and `grpo/` runs (checkpoints, TensorBoard,
JSONL, plots), `sweep/`, `accuracy.png` and `demo.md` with the before/after table. The
workdir may be local or gs://.
"""

import dataclasses
import json
from collections.abc import Callable, Sequence
import jax
from etils import epath

from jaxllm import config as config_lib
from jaxllm.data.readers import reasoning_problems
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.infer import Sampler
from jaxllm.plot import plot_run
from jaxllm.rl import sweep
from jaxllm.rl.evaluate import evaluate
from jaxllm.rl.loop import grpo
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.loop import pretrain
from jaxllm.train.run import load_run

SWEEP_PROBLEMS = 128
SWEEP_BUDGETS = "0,4,8,16,32"


def configs(workdir: str) -> tuple[config_lib.Config, config_lib.Config]:
    """The pretraining and the GRPO run of the demo."""
    model = config_lib.ModelConfig(
        vocab_size=384, embed_dim=192, num_layers=3, num_heads=6, num_kv_heads=2, mlp_dim=512
    )
    data = config_lib.DataConfig(difficulty=1)
    pre = config_lib.Config(
        model=model,
        data=data,
        train=config_lib.TrainConfig(
            steps=200, batch_size=32, seq_len=128, learning_rate=3e-3, warmup_steps=40,
            log_every=50, eval_every=100,
        ),
        checkpoint=config_lib.CheckpointConfig(every=100),
        workdir=str(workdir_lib.path(workdir, "pretrain")),
    )
    rl = config_lib.Config(
        model=model,
        data=data,
        train=config_lib.TrainConfig(
            steps=320, batch_size=128, seq_len=128, learning_rate=1e-4, warmup_steps=0,
            weight_decay=0.0, b2=0.999, log_every=10,
        ),
        grpo=config_lib.GRPOConfig(group_size=8, max_completion_len=48, eval_every=40),
        checkpoint=config_lib.CheckpointConfig(every=60),
        workdir=str(workdir_lib.path(workdir, "grpo")),
        init_from=pre.workdir,
    )
    return pre, rl


def split_overrides(overrides: Sequence[str], names: tuple[str, str] = ("pretrain", "rl")
                    ) -> tuple[list[str], list[str]]:
    """`pretrain.key=value` and `rl.key=value` (or the prefixes `names`) -> the overrides
    of each run."""
    first, second = [], []
    for item in overrides:
        prefix, _, rest = item.partition(".")
        if prefix not in names or not rest:
            raise config_lib.ConfigError(
                f"{item!r}: demo overrides start with {names[0]}. or {names[1]}., e.g. "
                f"{names[1]}.train.steps=20"
            )
        (first if prefix == names[0] else second).append(rest)
    return first, second


def accuracy(workdir: str, problems, temperature: float, max_new_tokens: int) -> dict:
    """Held-out accuracy of the latest checkpoint in `workdir`."""
    config, model, state = load_run(workdir)
    sampler = Sampler(model, state.params, load_tokenizer(config.data.tokenizer),
                      moe_bias=state.moe_bias)
    return evaluate(sampler, problems, rng=jax.random.key(1), temperature=temperature,
                    max_new_tokens=max_new_tokens)


def accuracy_plot(before: dict, after: dict, path: epath.Path) -> epath.Path:
    """Bars of held-out accuracy per task family, before and after GRPO."""
    from matplotlib.figure import Figure

    keys = ["accuracy"] + sorted(k for k in before if k.startswith("accuracy/"))
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.add_subplot()
    xs = range(len(keys))
    axes.bar([x - 0.2 for x in xs], [before[k] for k in keys], width=0.4, label="pretrained")
    axes.bar([x + 0.2 for x in xs], [after[k] for k in keys], width=0.4, label="after GRPO")
    axes.set_xticks(list(xs), [k.removeprefix("accuracy/") or k for k in keys])
    axes.set(ylabel="held-out accuracy (test split)", title="Accuracy before and after GRPO")
    axes.legend()
    return workdir_lib.save_figure(figure, path)


def table(results: dict[str, dict]) -> str:
    """Markdown: accuracy per task family for each (model, decoding) measurement."""
    first = next(iter(results.values()))
    keys = ["accuracy"] + sorted(k for k in first if k.startswith("accuracy/"))
    lines = ["| model | " + " | ".join(k.removeprefix("accuracy/") for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |"
              for name, r in results.items()]
    return "\n".join(lines)


def demo(workdir: str, overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> dict:
    """Runs the five stages; returns the accuracy measurements. A rerun resumes each stage."""
    pre_overrides, rl_overrides = split_overrides(overrides)
    pre, rl = configs(workdir)
    pre = config_lib.apply_overrides(pre, pre_overrides)
    rl = config_lib.apply_overrides(rl, rl_overrides)
    differences = [field.name for field in dataclasses.fields(pre.model) if field.name != "lora"
                   and getattr(pre.model, field.name) != getattr(rl.model, field.name)]
    if differences:
        raise config_lib.ConfigError(
            f"pretrain.model and rl.model differ in {', '.join(differences)}: GRPO starts from "
            f"the pretrained model, so give model overrides to both runs (pretrain.model.X=... "
            f"rl.model.X=...)")
    out = workdir_lib.path(workdir)

    log("== 1/5 pretraining on the offline reasoning corpus")
    pretrain(pre, log=log)
    problems = reasoning_problems(rl.data, "test")  # all `data.test_size` of them
    length = rl.grpo.max_completion_len
    log("== 2/5 held-out accuracy of the pretrained model")
    results = {
        "pretrained, sampled (T=1)": accuracy(pre.workdir, problems, 1.0, length),
        "pretrained, greedy": accuracy(pre.workdir, problems, 0.0, length),
    }
    log(table(results))
    log("== 3/5 GRPO")
    grpo(rl, log=log)
    log("== 4/5 held-out accuracy after GRPO")
    results["after GRPO, sampled (T=1)"] = accuracy(rl.workdir, problems, 1.0, length)
    results["after GRPO, greedy"] = accuracy(rl.workdir, problems, 0.0, length)

    log("== 5/5 thinking budget x self-consistency sweep, after GRPO")
    config, model, state = load_run(rl.workdir)
    sampler = Sampler(model, state.params, load_tokenizer(config.data.tokenizer),
                      moe_bias=state.moe_bias)
    rows = sweep.sweep(sampler, problems[:SWEEP_PROBLEMS], efforts=sweep.budgets(SWEEP_BUDGETS),
                       votes=(1, 4, 16), max_new_tokens=length, rng=jax.random.key(2), log=log)
    sweep.plot(rows, out / "sweep" / "sweep.png")
    plot_run(rl.workdir)
    accuracy_plot(results["pretrained, sampled (T=1)"], results["after GRPO, sampled (T=1)"],
                  out / "accuracy.png")

    summary = "\n\n".join([
        f"Held-out accuracy on {len(problems)} test problems:",
        table(results),
        f"Thinking budget x votes on {len(problems[:SWEEP_PROBLEMS])} test problems:",
        sweep.table(rows),
    ])
    workdir_lib.write_text(out / "demo.md", summary + "\n")
    workdir_lib.write_text(out / "demo.json",
                           json.dumps({"accuracy": results, "sweep": rows}, indent=2))
    log(summary)
    before = results["pretrained, sampled (T=1)"]["accuracy"]
    after = results["after GRPO, sampled (T=1)"]["accuracy"]
    log(f"demo: held-out accuracy {before:.3f} -> {after:.3f} after GRPO "
        f"({100 * (after - before):+.1f} points); plots in {out}")
    return results
