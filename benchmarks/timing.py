"""Timing and measuring helpers shared by the benchmark scripts: timed calls, XLA's FLOP and
memory figures of a compiled step, the machine's state around a run and markdown tables."""

import dataclasses
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import jax

MIB = 2**20


@dataclasses.dataclass
class Timing:
    """Wall seconds of each timed call, the CPU seconds the process spent in them, and the
    last call's result."""

    times: list[float]
    cpu: float
    out: object

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cores(self) -> float:
        """CPU cores busy while timing: CPU time over wall time."""
        return self.cpu / sum(self.times)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """Times `repeats` calls of `fn` after `warmup` untimed ones, each call blocked on until
    its result is ready."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times, cpu, out = [], 0.0, None
    for _ in range(repeats):
        cpu_start, start = time.process_time(), time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
        cpu += time.process_time() - cpu_start
    return Timing(times, cpu, out)


def guarded(measure, *arguments) -> dict:
    """`measure(*arguments)`, or {"error": ...} where it raises: one failing measurement
    must not end its section."""
    try:
        return measure(*arguments)
    except Exception as error:  # noqa: BLE001 -- recorded in the results, the run goes on
        return {"error": f"{type(error).__name__}: {str(error)[:500]}"}


def time_interleaved(calls: dict[str, tuple], reps: int) -> dict[str, Timing]:
    """name -> `Timing` of `reps` rounds that each time every call (fn, args) once, so that
    the machine's drift hits all alike. Each timed call follows an untimed one of the same
    fn: the caches and allocator then hold its own working set, not the previous call's."""
    rounds = {name: [] for name in calls}
    for _ in range(reps):
        for name, (fn, args) in calls.items():
            rounds[name].append(time_calls(lambda: fn(*args), repeats=1))
    return {name: Timing([t for r in runs for t in r.times], sum(r.cpu for r in runs),
                         runs[-1].out)
            for name, runs in rounds.items()}


def cost_flops(compiled) -> float:
    """XLA's FLOP count of a compiled (or lowered) computation."""
    cost = compiled.cost_analysis()
    if cost is None:  # GPU: a lowered computation has no analysis until compiled
        cost = compiled.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per module
    return float(cost["flops"])


def temp_bytes(compiled) -> int:
    """Temporary bytes per device of a compiled computation."""
    return compiled.memory_analysis().temp_size_in_bytes


def resident_bytes(compiled) -> int:
    """Arguments, outputs and temporaries per device of a compiled computation."""
    stats = compiled.memory_analysis()
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def command() -> str:
    """The command line that ran this benchmark."""
    return shlex.join(["python", *sys.argv])


def load() -> float:
    """The 1-minute load average: other processes on the same cores skew every time."""
    return os.getloadavg()[0]


def machine(load_before: float) -> str:
    """jax's version, the device and the CPUs, and the load average before the run."""
    device = jax.devices()[0]
    return (f"jax {jax.__version__} on {device.platform} ({device.device_kind}), "
            f"{os.cpu_count()} CPUs, load average {load_before:.2f} before the run")


def load_after(load_before: float) -> str:
    """The load average before and after the run, so that a noisy run can be spotted."""
    return (f"Load average (1 min) {load_before:.2f} before, {load():.2f} after, "
            f"on {os.cpu_count()} CPUs.")


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    """A markdown table of string cells."""
    lines = ["| " + " | ".join(line) + " |" for line in [header, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])
