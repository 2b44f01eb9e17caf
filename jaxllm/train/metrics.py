"""Run logs: a line per log step, JSONL and TensorBoard events in the workdir.

Only process 0 writes, so a multi-host run logs once. A resumed run first drops what the
previous run logged past the resumed step, so the logs read as one uninterrupted run. A
remote (gs://) workdir gets both logs through a local mirror, copied after each flush.
"""

import json
from pathlib import Path

import jax
from etils import epath
from tensorboardX import SummaryWriter

from jaxllm.train import workdir as workdir_lib


def format_line(metrics: dict, total_steps: int) -> str:
    line = (
        f"step {metrics['step']:>6}/{total_steps} | loss {metrics['loss']:.4f} "
        f"| grad_norm {metrics['grad_norm']:.3f} | lr {metrics['learning_rate']:.2e} "
        f"| {metrics['tokens_per_s']:,.0f} tok/s | {metrics['step_time_s']:.3f} s/step "
        f"| MFU {100 * metrics['mfu']:.1f}%"
    )
    loads = [v for k, v in metrics.items() if k.endswith("/load_max_over_mean")]
    if loads:  # an MoE model: the worst layer's balance and the total aux loss
        line += f" | load max/mean {max(loads):.2f} | aux {metrics['moe/aux_loss']:.2e}"
    return line


def format_eval_line(metrics: dict) -> str:
    return (
        f"step {metrics['step']:>6} | eval loss {metrics['eval_loss']:.4f} "
        f"| perplexity {metrics['eval_perplexity']:.3f}"
    )


def read_jsonl(path: Path | epath.Path) -> list[dict]:
    """The records of a metrics.jsonl file, in order.

    A last line without its newline, cut short by a killed process, is left out.
    """
    text = path.read_text()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def _truncate(path: Path, last_step: int) -> None:
    """Drops the records of steps after `last_step`: a resumed run logs them again."""
    if path.exists():
        kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class MetricsWriter:
    """Writes metrics to `workdir/metrics.jsonl` and TensorBoard events in `workdir/tb`,
    through `workdir_lib.local_dir` and `sync` for a remote workdir.

    `start_step` is the step a run starts after (0, or the resumed checkpoint's step):
    records past it are dropped from the JSONL, and TensorBoard is told to purge them.
    """

    def __init__(self, workdir: str | None, start_step: int):
        self.enabled = workdir is not None and jax.process_index() == 0
        if not self.enabled:
            return
        self.workdir = workdir
        jsonl = workdir_lib.pull(workdir, "metrics.jsonl")  # a remote run's earlier lines
        _truncate(jsonl, start_step)
        self.jsonl = open(jsonl, "a")
        local = workdir_lib.local_dir(workdir)
        self.tensorboard = SummaryWriter(str(local / "tb"), purge_step=start_step + 1)

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if key != "step":
                self.tensorboard.add_scalar(key, value, metrics["step"])
        self.tensorboard.flush()
        workdir_lib.sync(self.workdir)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
            workdir_lib.sync(self.workdir)
