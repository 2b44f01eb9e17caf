"""The test-time compute sweep: held-out accuracy against thinking budget and vote count,
or (`control_sweep`) against the effort control token alone, with no forcing."""

from collections.abc import Sequence
from pathlib import Path

import jax
from etils import epath

from jaxllm.data import tasks
from jaxllm.infer import Sampler
from jaxllm.infer import effort as effort_lib
from jaxllm.rl.evaluate import evaluate
from jaxllm.train import workdir as workdir_lib


def budgets(spec: str) -> dict[str, effort_lib.Effort]:
    """"0,8,32" -> {"instant": Effort(0), "8 tokens": Effort(8), "32 tokens": Effort(32)}."""
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"budgets: expected comma-separated integers, got {spec!r}") from None
    return {("instant" if b == 0 else f"{b} tokens"): effort_lib.Effort(b) for b in values}


def sweep(
    sampler: Sampler,
    problems: list[tasks.Problem],
    *,
    efforts: dict[str, effort_lib.Effort],
    votes: Sequence[int] = (1, 4, 16),
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    rng: jax.Array,
    log=print,
) -> list[dict]:
    """One row per (effort level, vote count): accuracy, agreement and thinking tokens."""
    rows = []
    for name, effort in efforts.items():
        for count in votes:
            result = evaluate(
                sampler, problems, effort=effort, votes=count, temperature=temperature,
                max_new_tokens=max_new_tokens, rng=jax.random.fold_in(rng, count),
            )
            row = {"effort": name, "budget": effort.budget, "votes": count, **result}
            log(f"effort {name:>8} (budget {effort.budget:>4}) votes {count:>3}: "
                f"accuracy {row['accuracy']:.3f}, thinking {row['thinking_tokens']:.1f} tokens")
            rows.append(row)
    return rows


def control_sweep(
    sampler: Sampler,
    problems: list[tasks.Problem],
    *,
    levels: Sequence[str],
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    rng: jax.Array,
    log=print,
) -> list[dict]:
    """One row per effort level whose control token `<effort:LEVEL>` is in the prompt, with
    no budget forcing: `max_new_tokens` is the only cap (reported as the row's budget). It
    measures whether the model itself thinks less at a lower level."""
    rows = []
    for level in levels:
        result = evaluate(sampler, problems, control=level, temperature=temperature,
                          max_new_tokens=max_new_tokens, rng=rng)
        rows.append({"effort": level, "budget": max_new_tokens, "votes": 1, **result})
        log(f"control <effort:{level}>: accuracy {result['accuracy']:.3f}, "
            f"thinking {result['thinking_tokens']:.1f} tokens")
    return rows


def table(rows: list[dict]) -> str:
    """The sweep as a markdown table."""
    lines = [
        "| effort | budget | votes | accuracy | agreement | thinking tokens |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['effort']} | {r['budget']} | {r['votes']} | {r['accuracy']:.3f} "
        f"| {r['agreement']:.2f} | {r['thinking_tokens']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path | epath.Path) -> epath.Path:
    """Accuracy against mean thinking tokens (one line per vote count) and against votes
    (one line per effort level), side by side in one PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    by_tokens, by_votes = figure.subplots(1, 2)
    for count in sorted({r["votes"] for r in rows}):
        chosen = sorted((r for r in rows if r["votes"] == count), key=lambda r: r["budget"])
        by_tokens.plot([r["thinking_tokens"] for r in chosen], [r["accuracy"] for r in chosen],
                       marker="o", label=f"{count} vote{'s' * (count > 1)}")
    for name in dict.fromkeys(r["effort"] for r in rows):
        chosen = sorted((r for r in rows if r["effort"] == name), key=lambda r: r["votes"])
        by_votes.plot([r["votes"] for r in chosen], [r["accuracy"] for r in chosen],
                      marker="o", label=name)
    by_tokens.set(xlabel="mean thinking tokens", ylabel="held-out accuracy",
                  title="accuracy vs thinking budget")
    by_votes.set(xlabel="votes (self-consistency)", ylabel="held-out accuracy", xscale="log",
                 title="accuracy vs votes")
    for axes in (by_tokens, by_votes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    return workdir_lib.save_figure(figure, path)  # a local or a gs:// path


def control_plot(series: dict[str, list[dict]], path: str | Path | epath.Path) -> epath.Path:
    """Accuracy against mean thinking tokens per effort level, one line per model (e.g.
    before and after training), each point labelled with its level, in one PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for name, rows in series.items():
        xs, ys = [r["thinking_tokens"] for r in rows], [r["accuracy"] for r in rows]
        axes.plot(xs, ys, marker="o", label=name)
        for row, x, y in zip(rows, xs, ys):
            axes.annotate(row["effort"], (x, y), textcoords="offset points", xytext=(4, 4),
                          fontsize=8)
    axes.set(xlabel="mean thinking tokens (unforced)", ylabel="held-out accuracy",
             title="accuracy vs thinking per effort control token")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return workdir_lib.save_figure(figure, path)  # a local or a gs:// path
