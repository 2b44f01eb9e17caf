"""SIGTERM as a request to stop: how Cloud TPU VMs announce a preemption.

In a single-process run, a handler turns SIGTERM into a flag that the loop checks after
each step, so it can save a checkpoint at the step it reached and exit cleanly. In a
multi-host run JAX's own preemption service takes the signal, and the hosts agree on the
step through `Checkpointer.reached_preemption`.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """Within the block, SIGTERM sets the yielded event instead of ending the process.

    The previous handler comes back on exit. Outside the main thread, or with several
    processes, no handler is installed and the event stays clear.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)
