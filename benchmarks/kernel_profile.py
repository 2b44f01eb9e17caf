"""Where a jitted call spends its device time: the kernels of a `jax.profiler` trace, summed by
name, so that a benchmark explains its own figures in the run that measures them."""

import collections
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
from jax.profiler import ProfileData


def trace_options() -> jax.profiler.ProfileOptions:
    """Device and host events only: no Python calls and no HLO protos in the trace, and an
    error, not an empty trace, where the device tracer cannot start."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.enable_hlo_proto = False
    options.raise_error_on_start_failure = True
    return options


def innermost(events: list) -> Iterator:
    """The events of one timeline that enclose no other (a CPU runs a while loop's body
    inside the loop's own event)."""
    events = sorted(events, key=lambda event: (event.start_ns, -event.duration_ns))
    for event, following in zip(events, [*events[1:], None]):
        if following is None or following.start_ns >= event.start_ns + event.duration_ns:
            yield event


def kernel_events(data: ProfileData) -> Iterator[tuple[str, float]]:
    """(name, nanoseconds) of every kernel and copy on the GPUs' streams; on a CPU, of the
    innermost host events that ran an HLO op. Other backends raise."""
    gpus = [plane for plane in data.planes if plane.name.startswith("/device:GPU")]
    if gpus:
        timelines = [list(line.events) for plane in gpus for line in plane.lines
                     if line.name.startswith("Stream #")]
    elif jax.default_backend() != "cpu":
        raise RuntimeError(f"the trace has no GPU plane (backend {jax.default_backend()})")
    else:
        timelines = [[event for event in line.events
                      if any(key == "hlo_op" for key, _ in event.stats)]
                     for plane in data.planes if plane.name == "/host:CPU"
                     for line in plane.lines]
    for events in timelines:
        for event in innermost(events):
            yield event.name, event.duration_ns


def top_kernels(call: Callable[[], object], *, calls: int = 2, top: int = 12) -> dict:
    """Traces `calls` calls of `call` (already compiled and warm) and returns the device's busy
    seconds per call (summed over streams) and its `top` kernels by time: each one's seconds
    and launches per call and its share of the busy time."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, profiler_options=trace_options()):
            for _ in range(calls):
                out = call()
            jax.block_until_ready(out)
        data = ProfileData.from_file(str(next(Path(trace_dir).rglob("*.xplane.pb"))))
    nanoseconds, launches = collections.Counter(), collections.Counter()
    for name, duration in kernel_events(data):
        nanoseconds[name] += duration
        launches[name] += 1
    return summary(nanoseconds, launches, calls=calls, top=top)


def summary(nanoseconds: collections.Counter, launches: collections.Counter, *, calls: int,
            top: int) -> dict:
    """The busy seconds per call and the `top` kernels of `calls` calls, from each kernel
    name's total nanoseconds and launches."""
    busy = sum(nanoseconds.values())
    if not busy:
        raise RuntimeError("the trace holds no kernel")
    kernels = [dict(name=name, seconds=ns * 1e-9 / calls, launches=launches[name] / calls,
                    share=ns / busy)
               for name, ns in nanoseconds.most_common(top)]
    return dict(calls=calls, busy_s=busy * 1e-9 / calls, kernels=kernels)
