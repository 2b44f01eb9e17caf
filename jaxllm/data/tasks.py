"""Reasoning task families: seeded problems with short worked solutions.

Pure Python and numpy. The reasoning corpus, the packed pretraining documents and the RL phase
all use this module's public API: `Problem`, `generate`, `prompt`, `solution` and `document`
(and `effort_document`, its effort-conditioned variant).

The text format of one problem, e.g. an arithmetic one:

    prompt:    "Q: 347*86=?\n"
    solution:  "347*6=2082,347*80=27760,2082+27760=29842"
    answer:    "29842"
    document:  prompt + "<think>" + solution + "</think><answer>" + answer + "</answer>"

Families and their canonical answers:
  arithmetic     "Q: 347+586=?"            an integer, e.g. "933" or "-239" (with + - or *);
  linear         "Q: 3x-7=8, x=?"          the integer solution, e.g. "5";
  quadratic      "Q: x^2-5x+6=0, x=?"      the integer roots ascending, joined by ", ", a double
                                           root written once: "2, 3", "-1, 4", "3";
  countdown      "Q: make 20 from 2,3,4"   an expression that uses each number exactly once with
                                           + - * / and parentheses, e.g. "(2+3)*4"; any such
                                           expression that reaches the target is correct.
Countdown problems also carry `numbers` and `target`.

`tool_document` writes an arithmetic or countdown problem's solution with a tool call inside
the thought, and the exact result the built-in tool returns (`jaxllm.tools`):

    "Q: 347*86=?\n<think><tool>calc: 347*86</tool><result>29842</result></think>..."
    "Q: make 20 from 2,3,4\n<think>2+3=5,5*4=20<tool>countdown: make 20 from 2,3,4 by
     (2+3)*4</tool><result>yes</result></think><answer>(2+3)*4</answer>"

`difficulty` (1, 2, 3, ...) scales every family: operand digits (difficulty + 1 at most),
coefficient and root ranges, and the count of countdown numbers (difficulty + 1). At the
default 2, a document is at most about 110 bytes.
"""

import dataclasses
import math
import re
import zlib

import numpy as np

from jaxllm.tools import builtin

FAMILIES = ("arithmetic", "linear", "quadratic", "countdown")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: its family, question, canonical answer and, for countdown, the inputs."""

    family: str
    question: str
    answer: str
    numbers: tuple[int, ...] = ()
    target: int | None = None


def prompt(problem: Problem) -> str:
    """The text a model sees before it starts thinking."""
    return f"Q: {problem.question}\n"


def document(problem: Problem) -> str:
    """The full training text: prompt, worked solution and answer."""
    return (
        f"{prompt(problem)}<think>{solution(problem)}</think>"
        f"<answer>{problem.answer}</answer>"
    )


TOOL_FAMILIES = ("arithmetic", "countdown")


def tool_document(problem: Problem) -> str:
    """The training text of `problem` with a tool call in its thought (`TOOL_FAMILIES`)."""
    if problem.family == "arithmetic":
        thought, name, args = "", "calc", problem.question.removesuffix("=?")
    elif problem.family == "countdown":
        thought, name = solution(problem), "countdown"
        args = f"{problem.question} by {problem.answer}"
    else:
        raise ValueError(f"family: {problem.family!r} has no tool; tools serve {TOOL_FAMILIES}")
    result = builtin.BUILTINS[name](args)
    return (
        f"{prompt(problem)}<think>{thought}<tool>{name}: {args}</tool><result>{result}</result>"
        f"</think><answer>{problem.answer}</answer>"
    )


# The share of a worked solution's steps kept at each effort level (its last steps).
EFFORT_SHARES = {"instant": 0.0, "low": 1 / 3, "medium": 2 / 3, "high": 1.0}


def effort_document(text: str, level: str) -> str:
    """A `document` text with the control token `<effort:level>` before `<think>` and its
    worked solution cut to the last ceil(share * steps) comma-separated steps
    (`EFFORT_SHARES`): instant thinks not at all, high writes the whole solution."""
    head, sep, rest = text.partition("<think>")
    thought, close, tail = rest.partition("</think>")
    if not (sep and close) or level not in EFFORT_SHARES:
        raise ValueError(f"effort_document: needs a document with a thought and a level of "
                         f"{list(EFFORT_SHARES)}, got {level!r}")
    steps = thought.split(",") if thought else []
    kept = steps[len(steps) - math.ceil(EFFORT_SHARES[level] * len(steps)):]
    return f"{head}<effort:{level}><think>{','.join(kept)}</think>{tail}"


def effort_documents(texts: list[str]) -> list[str]:
    """Each `document` text as its `effort_document` at a level picked by the text's hash,
    so a document keeps its level whichever process or epoch reads it."""
    levels = list(EFFORT_SHARES)
    return [effort_document(t, levels[zlib.crc32(t.encode()) % len(levels)]) for t in texts]


def generate(family: str, rng: np.random.Generator, difficulty: int = 2) -> Problem:
    """One random problem of `family`."""
    if family not in _GENERATORS:
        raise ValueError(f"unknown task family {family!r}; choose from {FAMILIES}")
    return _GENERATORS[family](rng, difficulty)


def solution(problem: Problem) -> str:
    """The step-by-step worked solution of `problem`, recomputed from its question."""
    return _SOLVERS[problem.family](problem)


# ---------------------------------------------------------------------------------------
# Multi-digit arithmetic: column sums with carries, column differences with borrows,
# and partial products.


def _operand(rng: np.random.Generator, max_digits: int) -> int:
    digits = int(rng.integers(1, max_digits + 1))
    return int(rng.integers(10 ** (digits - 1) if digits > 1 else 0, 10**digits))


def _make_arithmetic(rng: np.random.Generator, difficulty: int) -> Problem:
    """a+b, a-b (either may be larger) or a*b, the multiplier one digit shorter."""
    op = "+-*"[int(rng.integers(3))]
    a = _operand(rng, difficulty + 1)
    b = _operand(rng, difficulty if op == "*" else difficulty + 1)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Problem("arithmetic", f"{a}{op}{b}=?", str(value))


def _solve_arithmetic(problem: Problem) -> str:
    a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=\?", problem.question).groups()
    return {"+": _solve_add, "-": _solve_sub, "*": _solve_mul}[op](int(a), int(b))


def _digits(n: int, width: int) -> list[int]:
    """The decimal digits of n >= 0, ones first, padded to `width`."""
    return [int(d) for d in str(n).zfill(width)[::-1]]


def _solve_add(a: int, b: int) -> str:
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width)):
        total = da + db + carry
        steps.append(f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return ",".join(steps)


def _solve_sub(a: int, b: int) -> str:
    top, bottom = max(a, b), min(a, b)
    width = len(str(top))
    steps, borrow = [], 0
    for dt, db in zip(_digits(top, width), _digits(bottom, width)):
        low = db + borrow
        borrow = int(dt < low)
        steps.append(f"{dt + 10 * borrow}-{low}={dt + 10 * borrow - low}")
    if a < b:
        steps.append(f"{a}-{b}=-{b - a}")
    return ",".join(steps)


def _solve_mul(a: int, b: int) -> str:
    places = [d * 10**k for k, d in enumerate(_digits(b, len(str(b)))) if d]
    steps = [f"{a}*{place}={a * place}" for place in places]
    if len(places) > 1:
        steps.append("+".join(str(a * place) for place in places) + f"={a * b}")
    return ",".join(steps) or f"{a}*0=0"


# ---------------------------------------------------------------------------------------
# Linear equations a*x + b = c with an integer solution.


def _make_linear(rng: np.random.Generator, difficulty: int) -> Problem:
    bound = 5 * difficulty
    a = int(rng.choice([k for k in range(-bound, bound + 1) if k not in (0, 1, -1)]))
    x = int(rng.integers(-bound, bound + 1))
    b = int(rng.choice([k for k in range(-4 * bound, 4 * bound + 1) if k != 0]))
    return Problem("linear", f"{a}x{b:+d}={a * x + b}, x=?", str(x))


def _parse_linear(question: str) -> tuple[int, int, int]:
    lhs, c = question.removesuffix(", x=?").split("=")
    a, b = lhs.split("x")
    return int(a), int(b), int(c)


def _solve_linear(problem: Problem) -> str:
    a, b, c = _parse_linear(problem.question)
    sign = "-" if b > 0 else "+"
    return f"{a}x={c}{sign}{abs(b)}={c - b},x={c - b}/{a}={(c - b) // a}"


# ---------------------------------------------------------------------------------------
# Monic quadratics with integer roots: x^2 + p*x + q = 0, solved by Vieta's formulas.


def _make_quadratic(rng: np.random.Generator, difficulty: int) -> Problem:
    bound = 4 * difficulty
    r, s = sorted(int(v) for v in rng.integers(-bound, bound + 1, size=2))
    p, q = -(r + s), r * s
    x_term = {0: "", 1: "+x", -1: "-x"}.get(p, f"{p:+d}x")
    constant = f"{q:+d}" if q else ""
    answer = str(r) if r == s else f"{r}, {s}"
    return Problem("quadratic", f"x^2{x_term}{constant}=0, x=?", answer)


def _solve_quadratic(problem: Problem) -> str:
    roots = [int(v) for v in problem.answer.split(", ")]
    r, s = roots[0], roots[-1]
    factors = "".join(f"(x{-v:+d})" if v else "x" for v in (r, s))
    return f"r+s={r + s},r*s={r * s},{factors}=0"


# ---------------------------------------------------------------------------------------
# Countdown: reach a target from numbers, each used once, with + - * / and parentheses.
# Instances are built from a random expression, so each one is solvable; every
# intermediate value is a positive integer.

_LARGE = (25, 50, 75, 100)


def _make_countdown(rng: np.random.Generator, difficulty: int) -> Problem:
    count = difficulty + 1
    while True:
        numbers = [int(rng.integers(1, 11)) if rng.random() < 0.8 else int(rng.choice(_LARGE))
                   for _ in range(count)]
        built = _random_expression(rng, numbers)
        if built is not None and built[1] not in numbers:
            text, target = built
            shown = tuple(sorted(numbers))
            return Problem(
                "countdown", f"make {target} from {','.join(map(str, shown))}", text,
                numbers=shown, target=target,
            )


def _random_expression(rng: np.random.Generator, numbers: list[int]) -> tuple[str, int] | None:
    """Combines the numbers pairwise in random order; None when a step is not allowed."""
    terms = [(str(n), n) for n in numbers]
    while len(terms) > 1:
        i, j = rng.choice(len(terms), size=2, replace=False)
        (left, a), (right, b) = terms[i], terms[j]
        op = "+-*/"[int(rng.integers(4))]
        if op == "-" and a <= b or op == "/" and (b == 1 or a % b):
            return None
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        rest = [t for k, t in enumerate(terms) if k not in (i, j)]
        terms = rest + [(f"{_wrap(left)}{op}{_wrap(right)}", value)]
    return terms[0]


def _wrap(text: str) -> str:
    return text if text.isdigit() else f"({text})"


def _solve_countdown(problem: Problem) -> str:
    """The evaluation steps of the answer expression, innermost first."""
    steps = []

    def value(text: str) -> int:
        if text.isdigit():
            return int(text)
        left, op, right = _split_top(text)
        a, b = value(_unwrap(left)), value(_unwrap(right))
        result = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        steps.append(f"{a}{op}{b}={result}")
        return result

    value(problem.answer)
    return ",".join(steps)


def _split_top(text: str) -> tuple[str, str, str]:
    """Splits 'L op R', where each side is a number or one parenthesised group."""
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and char in "+-*/":
            return text[:i], char, text[i + 1:]
    raise ValueError(f"not a binary expression: {text!r}")


def _unwrap(text: str) -> str:
    return text[1:-1] if text.startswith("(") else text


_GENERATORS = {
    "arithmetic": _make_arithmetic,
    "linear": _make_linear,
    "quadratic": _make_quadratic,
    "countdown": _make_countdown,
}
_SOLVERS = {
    "arithmetic": _solve_arithmetic,
    "linear": _solve_linear,
    "quadratic": _solve_quadratic,
    "countdown": _solve_countdown,
}
