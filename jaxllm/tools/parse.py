"""A strict grammar for model answers: numbers, lists of numbers, countdown expressions.

Model output is untrusted text. Nothing here evaluates it as code: numbers are matched by
anchored ASCII patterns, and countdown expressions go through a recursive-descent parser
over `+ - * /` and parentheses with exact `Fraction` arithmetic. Inputs are bounded in
length, literal size and nesting depth, so every call finishes in microseconds.

    number := -?D+ | -?D+/D+ | -?D+.D+       (D an ASCII digit, at most MAX_DIGITS of them)
    list   := number (, number)*  optionally inside (), [] or {}
    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := D+ | '(' expr ')'
"""

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

MAX_CHARS = 256  # longest answer text accepted
MAX_DIGITS = 18  # longest digit run in one literal
MAX_DEPTH = 16  # deepest parenthesis nesting in an expression


class ParseError(ValueError):
    """The text does not follow the answer grammar."""


_INTEGER = re.compile(rf"(-?)([0-9]{{1,{MAX_DIGITS}}})", re.ASCII)
_FRACTION = re.compile(rf"(-?)([0-9]{{1,{MAX_DIGITS}}})/([0-9]{{1,{MAX_DIGITS}}})", re.ASCII)
_DECIMAL = re.compile(rf"(-?)([0-9]{{1,{MAX_DIGITS}}})\.([0-9]{{1,{MAX_DIGITS}}})", re.ASCII)
_BRACKETS = {"(": ")", "[": "]", "{": "}"}
_TOKEN = re.compile(r"[ ]*(?:([0-9]+)|([-+*/()]))", re.ASCII)


def _bounded(text: str) -> str:
    if not isinstance(text, str):
        raise ParseError(f"expected text, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise ParseError(f"answer has {len(text)} characters; at most {MAX_CHARS} are parsed")
    return text.strip()


def parse_number(text: str, *, fractions: bool = True, decimals: bool = True) -> Fraction:
    """An integer, or where allowed a fraction "3/4" or a decimal "0.75", as an exact Fraction."""
    text = _bounded(text)
    if m := _INTEGER.fullmatch(text):
        value = Fraction(int(m[2]))
    elif fractions and (m := _FRACTION.fullmatch(text)):
        if int(m[3]) == 0:
            raise ParseError(f"zero denominator in {text!r}")
        value = Fraction(int(m[2]), int(m[3]))
    elif decimals and (m := _DECIMAL.fullmatch(text)):
        value = Fraction(int(m[2] + m[3]), 10 ** len(m[3]))
    else:
        raise ParseError(f"not a number: {text[:32]!r}")
    return -value if m[1] else value


def parse_number_list(text: str, **number_options) -> tuple[Fraction, ...]:
    """Comma-separated numbers, "2, 3", optionally bracketed: "{2, 3}", "[2, 3]", "(2, 3)"."""
    text = _bounded(text)
    if text[:1] in _BRACKETS:
        if text[-1:] != _BRACKETS[text[0]]:
            raise ParseError(f"unbalanced brackets in {text[:32]!r}")
        text = text[1:-1]
    return tuple(parse_number(item, **number_options) for item in text.split(","))


@dataclasses.dataclass(frozen=True)
class Expression:
    """A parsed arithmetic expression: its exact value and its integer literals in order."""

    value: Fraction
    numbers: tuple[int, ...]


def _tokenize(text: str) -> list[str]:
    tokens, pos, end = [], 0, len(text.rstrip(" "))
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ParseError(f"unexpected character {text[pos]!r} at position {pos}")
        if m[1] is not None and len(m[1]) > MAX_DIGITS:
            raise ParseError(f"literal with {len(m[1])} digits; at most {MAX_DIGITS} allowed")
        tokens.append(m[1] or m[2])
        pos = m.end()
    return tokens


class _Parser:
    """Recursive descent over a token list; `numbers` collects the literals it reads."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.depth, self.numbers = tokens, 0, 0, []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | None:
        token = self.peek()
        self.pos += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op, right = self.take(), self.factor()
            if op == "*":
                value *= right
            elif right == 0:
                raise ParseError("division by zero")
            else:
                value /= right
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if token is not None and token.isdigit():
            self.numbers.append(int(token))
            return Fraction(int(token))
        if token != "(":
            raise ParseError(f"expected a number or '(', got {token!r}")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError(f"parentheses nest deeper than {MAX_DEPTH}")
        value = self.expr()
        if self.take() != ")":
            raise ParseError("missing ')'")
        self.depth -= 1
        return value


def parse_expression(text: str) -> Expression:
    """Parses and evaluates `+ - * /` over non-negative integer literals, with parentheses.

    There is no unary minus and no exponent: "9**9" fails at its second '*'.
    """
    parser = _Parser(_tokenize(_bounded(text)))
    value = parser.expr()
    if parser.peek() is not None:
        raise ParseError(f"unexpected {parser.peek()!r} after a complete expression")
    return Expression(value, tuple(parser.numbers))


def reaches_target(expression: Expression, numbers: Sequence[int], target: int) -> bool:
    """Whether `expression` uses each of `numbers` exactly once and evaluates to `target`."""
    return expression.value == Fraction(target) and Counter(expression.numbers) == Counter(
        int(n) for n in numbers
    )
