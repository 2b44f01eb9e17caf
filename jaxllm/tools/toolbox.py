"""A registry of tools, `str -> str` functions that run in a worker process under limits.

A call is the text between `<tool>` and `</tool>`: `NAME: ARGS`. Every way a call can go
wrong (a malformed call, an unknown tool, an argument or output over its limit, an
exception, a time-out, a crashed worker) comes back as an error string that starts with
"error:", never as an exception, so a generation loop can hand it to the model as the result.

Tools run in one worker process started with `spawn` (no fork of a multithreaded JAX
process). A thread cannot be stopped, and a long C-level operation such as `9**9**9` in a
tool holds the GIL, so a thread would not even let the caller time out; a process that runs
past its limit is killed, and the next call starts a fresh one. Tool functions must
therefore be picklable: defined at the top level of a module.
"""

import dataclasses
import multiprocessing
import pickle
import re
from collections.abc import Callable

STARTUP_S = 120.0  # the most seconds the worker may take to start and import the tools
CALL = re.compile(r"([a-z][a-z0-9_]{0,31}):[ ]?(.*)", re.ASCII | re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Tool:
    """A named function and its limits: seconds per call, characters in and out."""

    name: str
    fn: Callable[[str], str]
    timeout_s: float = 1.0
    max_input: int = 256
    max_output: int = 256

    def __post_init__(self):
        if not CALL.fullmatch(f"{self.name}:"):
            raise ValueError(f"name: {self.name!r} must match [a-z][a-z0-9_]{{0,31}}")
        if self.timeout_s <= 0 or self.max_input < 1 or self.max_output < 1:
            raise ValueError(f"{self.name}: timeout_s, max_input and max_output must be > 0")


def parse_call(text: str) -> tuple[str, str] | None:
    """(name, arguments) of a call `NAME: ARGS`, or None when it does not have that form."""
    match = CALL.fullmatch(text)
    return None if match is None else (match[1], match[2])


def _run(fn: Callable[[str], str], args: str, max_output: int) -> str:
    """In the worker: the function's output, or an error string."""
    try:
        output = fn(args)
    except Exception as error:  # noqa: BLE001  (any failure of a tool is its result)
        return f"error: {type(error).__name__}: {str(error)[:80]}"
    if not isinstance(output, str):
        return f"error: the tool returned {type(output).__name__}, not text"
    if len(output) > max_output:
        return f"error: output of {len(output)} characters; the limit is {max_output}"
    return output


def _serve(connection, tools: dict[str, "Tool"]) -> None:
    """The worker's loop: say it is ready, then receive (name, args), send back the text."""
    connection.send("ready")
    while True:
        name, args = connection.recv()
        connection.send(_run(tools[name].fn, args, tools[name].max_output))


class Toolbox:
    """Tools by name, and the worker process that runs them. Close it when done (or use it
    as a context manager)."""

    def __init__(self, tools: list[Tool] = ()):
        self.tools: dict[str, Tool] = {}
        self._worker = self._connection = None
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Adds a tool; a running worker is restarted at the next call to include it."""
        if tool.name in self.tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        try:
            pickle.dumps(tool.fn)
        except Exception as error:
            raise ValueError(f"{tool.name}: the function must be picklable, defined at the top "
                             f"level of a module ({type(error).__name__})") from None
        self.tools[tool.name] = tool
        self.close()

    def call(self, text: str) -> str:
        """The output of the call `NAME: ARGS`, or an "error: ..." string."""
        parsed = parse_call(text)
        if parsed is None:
            return "error: a call is NAME: ARGS, e.g. calc: 37*41"
        name, args = parsed
        tool = self.tools.get(name)
        if tool is None:
            return f"error: unknown tool {name!r}; the tools are {', '.join(sorted(self.tools))}"
        if len(args) > tool.max_input:
            return f"error: argument of {len(args)} characters; the limit is {tool.max_input}"
        return self._run_in_worker(tool, args)

    def _run_in_worker(self, tool: Tool, args: str) -> str:
        try:
            self._start()
            self._connection.send((tool.name, args))
            if self._connection.poll(tool.timeout_s):
                return self._connection.recv()
            error = f"error: tool {tool.name!r} ran past its {tool.timeout_s:g} s limit"
        except (EOFError, OSError) as failure:
            error = f"error: tool {tool.name!r} failed: {type(failure).__name__}"
        self.close()  # a worker that timed out or died is replaced at the next call
        return error

    def _start(self) -> None:
        """Starts the worker, which imports the tools' modules before it says it is ready."""
        if self._worker is not None:
            return
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._worker = context.Process(target=_serve, args=(child, self.tools), daemon=True)
        self._worker.start()
        child.close()
        if not self._connection.poll(STARTUP_S) or self._connection.recv() != "ready":
            raise OSError("the tool worker did not start")

    def close(self) -> None:
        """Stops the worker process, if one runs."""
        if self._worker is not None:
            self._worker.kill()
            self._worker.join()
            self._connection.close()
            self._worker = self._connection = None

    def __enter__(self) -> "Toolbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
