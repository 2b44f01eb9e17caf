"""Run logs: a line per log step on stdout, JSONL and TensorBoard events in the workdir.

Only process 0 writes, so a multi-host run logs once.
"""

import json
from pathlib import Path

import jax
from tensorboardX import SummaryWriter


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


class MetricsWriter:
    """Writes metrics to `workdir/metrics.jsonl` and TensorBoard events in `workdir/tb`."""

    def __init__(self, workdir: str | None):
        self.enabled = workdir is not None and jax.process_index() == 0
        if not self.enabled:
            return
        Path(workdir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(workdir) / "metrics.jsonl", "a")
        self.tensorboard = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if key != "step":
                self.tensorboard.add_scalar(key, value, metrics["step"])
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
