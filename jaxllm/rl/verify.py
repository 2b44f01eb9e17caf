"""Per-family answer checks for the reasoning tasks.

A model's answer that does not parse is simply wrong; a reference answer that does not
parse is a bug in the task and raises. Families and canonical answers:

- arithmetic, linear: one number, "-12"; "3/4" and "0.75" are the same answer.
- quadratic: the set of roots, "2, 3"; any order; a double root is written once.
- countdown: an expression, "(3+5)*2", that uses each given number exactly once and
  evaluates to the target.
- the image families (`jaxllm.data.images`): count, digit and sum answer one number, checked
  as arithmetic is; colour and shape answer one word, "red", compared without case or the
  spaces around it.
"""

from collections.abc import Callable, Sequence

from jaxllm.tools.parse import (
    ParseError, parse_expression, parse_number, parse_number_list, reaches_target,
)


def _or_none(parse: Callable, text: str):
    try:
        return parse(text)
    except ParseError:
        return None


def _same_number(text: str, answer: str, numbers, target) -> bool:
    return _or_none(parse_number, text) == parse_number(answer)


def _same_roots(text: str, answer: str, numbers, target) -> bool:
    got = _or_none(parse_number_list, text)
    return got is not None and len(set(got)) == len(got) and set(got) == set(
        parse_number_list(answer)
    )


def _word_form(text: str) -> str:
    return text.strip().lower()


def _same_word(text: str, answer: str, numbers, target) -> bool:
    return _word_form(text) == answer


def _reaches_target(text: str, answer: str, numbers, target) -> bool:
    if numbers is None or target is None:
        raise ValueError("countdown: needs the given `numbers` and the `target`")
    expression = _or_none(parse_expression, text)
    return expression is not None and reaches_target(expression, numbers, target)


CHECKS: dict[str, Callable[..., bool]] = {
    "arithmetic": _same_number,
    "linear": _same_number,
    "quadratic": _same_roots,
    "countdown": _reaches_target,
    "colour": _same_word,
    "shape": _same_word,
    "count": _same_number,
    "digit": _same_number,
    "sum": _same_number,
}


def _number_form(text: str) -> str:
    number = _or_none(parse_number, text)
    return text.strip() if number is None else str(number)


def _roots_form(text: str) -> str:
    roots = _or_none(parse_number_list, text)
    if roots is None or len(set(roots)) != len(roots):  # a repeated root stays wrong
        return text.strip()
    return ", ".join(str(root) for root in sorted(roots))


# One string per answer that `CHECKS` treats as the same, so votes count them together.
CANONICAL: dict[str, Callable[[str], str]] = {
    "arithmetic": _number_form,
    "linear": _number_form,
    "quadratic": _roots_form,
    "countdown": lambda text: "".join(text.split()),
    "colour": _word_form,
    "shape": _word_form,
    "count": _number_form,
    "digit": _number_form,
    "sum": _number_form,
}


def canonical_answer(family: str, completion_answer: str | None) -> str | None:
    """`completion_answer` in one form per answer the family's check treats as the same
    ("0.75" and "3/4" as "3/4"; roots in ascending order), for voting; None stays None."""
    if family not in CANONICAL:
        raise ValueError(f"family: unknown {family!r}; expected one of {sorted(CANONICAL)}")
    return None if completion_answer is None else CANONICAL[family](completion_answer)


def is_correct(
    family: str,
    completion_answer: str | None,
    answer: str,
    numbers: Sequence[int] | None = None,
    target: int | None = None,
) -> bool:
    """Whether `completion_answer` (the text inside <answer>, or None) solves the task.

    `answer` is the canonical answer; countdown checks `numbers` and `target` instead.
    """
    if family not in CHECKS:
        raise ValueError(f"family: unknown {family!r}; expected one of {sorted(CHECKS)}")
    if completion_answer is None:
        return False
    return CHECKS[family](completion_answer, answer, numbers, target)
