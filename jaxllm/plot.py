"""PNG curves of a run from its `metrics.jsonl`: loss, learning rate, throughput and reward."""

from pathlib import Path

from etils import epath
from matplotlib.figure import Figure

from jaxllm.train import workdir as workdir_lib
from jaxllm.train.metrics import read_jsonl

# file name -> (title, y label, [(metric, legend label)], log scale)
PLOTS = {
    "loss.png": ("Loss", "cross-entropy (nats/token)",
                 [("loss", "train"), ("eval_loss", "eval")], True),
    "learning_rate.png": ("Learning rate", "learning rate", [("learning_rate", "lr")], False),
    "throughput.png": ("Throughput", "tokens/s", [("tokens_per_s", "tokens/s")], False),
    "reward.png": ("GRPO reward", "reward / accuracy",
                   [("reward", "train reward"), ("eval/accuracy", "held-out accuracy")], False),
}


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(workdir: str | Path) -> list[epath.Path]:
    """Writes `workdir/plots/{loss,learning_rate,throughput,reward}.png`, those the run has
    metrics for; returns their paths. The workdir may be local or gs://.

    Uses matplotlib's Agg canvas directly, so no display and no pyplot state are involved.
    """
    path = workdir_lib.path(workdir, "metrics.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {workdir} the workdir of a run?")
    records = read_jsonl(path)
    out = workdir_lib.path(workdir, "plots")
    written = []
    for name, (title, ylabel, curves, log_scale) in PLOTS.items():
        if not any(key in r for r in records for key, _ in curves):
            continue  # e.g. no throughput in an RL run, no reward in pretraining
        figure = Figure(figsize=(7, 4), layout="constrained")
        axes = figure.add_subplot()
        positive = True
        for key, label in curves:
            steps, values = _series(records, key)
            if steps:
                axes.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None)
                positive = positive and min(values) > 0
        scale = "log" if log_scale and positive else "linear"  # a GRPO loss can be negative
        axes.set(title=title, xlabel="step", ylabel=ylabel, yscale=scale)
        axes.grid(alpha=0.3)
        if len(curves) > 1:
            axes.legend()
        written.append(workdir_lib.save_figure(figure, out / name))
    return written
