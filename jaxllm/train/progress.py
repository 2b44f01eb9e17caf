"""Progress on the terminal: a bar with an ETA when stderr is interactive, plain lines if not."""

import datetime
import sys
from collections.abc import Callable

from tqdm import tqdm

from jaxllm.train.metrics import format_line


def eta(seconds_per_step: float, steps_left: int) -> str:
    """'H:MM:SS' of `steps_left` more steps at `seconds_per_step` each."""
    return str(datetime.timedelta(seconds=round(seconds_per_step * steps_left)))


class Progress:
    """Reports the steps of a run from `start` to `total`.

    Interactive (stderr is a terminal, unless told otherwise): a tqdm bar on stderr with the
    ETA and the last loss, and log lines printed above it. Otherwise only the log lines,
    each ending with the ETA.
    """

    def __init__(
        self, total: int, start: int, log: Callable[[str], None], interactive: bool | None = None
    ):
        self.total, self.log = total, log
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None
        if interactive:
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def advance(self, step: int) -> None:
        """Moves the bar to `step`."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def report(self, metrics: dict) -> None:
        """Prints a log step's line; without a bar, it ends with the ETA."""
        line = format_line(metrics, self.total)
        if self.bar is None:
            line += f" | ETA {eta(metrics['step_time_s'], self.total - metrics['step'])}"
        else:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        self.write(line)

    def write(self, line: str) -> None:
        """Prints `line` through `log`, above the bar if there is one."""
        if self.bar is None:
            self.log(line)
            return
        with self.bar.external_write_mode():
            self.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
