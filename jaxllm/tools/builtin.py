"""The built-in tools: an exact calculator and a countdown checker, on the strict parser.

    calc: 37*41                          -> 1517        (exact fractions: "7/2" for 7/2)
    countdown: make 20 from 2,3,4 by (2+3)*4   -> yes   (or "no: it makes 21", "no: it uses 2,3")

Both parse with `jaxllm.tools.parse`: `+ - * /`, parentheses and non-negative integer
literals of at most 18 digits, in at most 256 characters; there is no exponent and no
`eval`, so any input finishes in microseconds with a bounded result.
"""

import re

from jaxllm.tools.parse import ParseError, parse_expression, reaches_target
from jaxllm.tools.toolbox import Tool, Toolbox

_COUNTDOWN = re.compile(r"make ([0-9]{1,9}) from ([0-9]{1,9}(?:,[0-9]{1,9}){0,15}) by (.+)",
                        re.ASCII)


def format_number(value) -> str:
    """A Fraction as "12", "-3" or "7/2"."""
    return str(value.numerator) if value.denominator == 1 else str(value)


def calc(args: str) -> str:
    """The exact value of an arithmetic expression."""
    try:
        return format_number(parse_expression(args).value)
    except ParseError as error:
        return f"error: {error}"


def countdown(args: str) -> str:
    """Whether `make TARGET from N,N,... by EXPR` reaches the target using each number once."""
    match = _COUNTDOWN.fullmatch(args.strip())
    if match is None:
        return "error: expected 'make TARGET from N,N,... by EXPRESSION'"
    target, numbers = int(match[1]), [int(n) for n in match[2].split(",")]
    try:
        expression = parse_expression(match[3])
    except ParseError as error:
        return f"error: {error}"
    if reaches_target(expression, numbers, target):
        return "yes"
    if sorted(expression.numbers) != sorted(numbers):
        return f"no: it uses {','.join(map(str, expression.numbers))}"
    return f"no: it makes {format_number(expression.value)}"


BUILTINS = {"calc": calc, "countdown": countdown}


def toolbox(names: tuple[str, ...] | list[str], **limits) -> Toolbox:
    """A `Toolbox` of the named built-ins, with `Tool`'s limits (timeout_s, max_input,
    max_output) where given."""
    unknown = sorted(set(names) - BUILTINS.keys())
    if unknown:
        raise ValueError(f"tools: unknown {unknown}; the built-ins are {sorted(BUILTINS)}")
    return Toolbox([Tool(name, BUILTINS[name], **limits) for name in names])
