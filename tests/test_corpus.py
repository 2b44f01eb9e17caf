"""The reasoning task families and the TFDS-built offline corpus.

Answers are checked by computations written here, independently of `jaxllm.data.tasks`:
integer arithmetic, substitution into the equation, and a small exact-fraction parser for
countdown expressions.
"""

import collections
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from jaxllm import Config, ConfigError, DataConfig
from jaxllm.data import make_source, readers, tasks

SIZES = dict(train_size=240, validation_size=24, test_size=24)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    from jaxllm.data import corpus

    path = tmp_path_factory.mktemp("tfds")
    corpus.prepare(str(path), seed=0, **SIZES)
    return path


def read_split(data_dir: Path, split: str) -> list[tasks.Problem]:
    return readers.reasoning_problems(DataConfig(data_dir=str(data_dir), **SIZES), split)


# ---------------------------------------------------------------------------------------
# An independent checker


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """The exact value of an integer expression with + - * / and parentheses, and the
    numbers it uses. Precedence: * and / bind tighter; a number may carry a leading minus."""
    tokens = re.findall(r"\d+|[-+*/()]", expression)
    assert "".join(tokens) == expression, f"unexpected characters in {expression!r}"
    numbers, pos = [], 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def factor():
        if peek() == "(":
            take()
            value = expr()
            assert take() == ")"
            return value
        sign = -1 if peek() == "-" and take() else 1
        numbers.append(int(take()))
        return sign * Fraction(numbers[-1])

    def term():
        value = factor()
        while peek() in ("*", "/"):
            value = value * factor() if take() == "*" else value / factor()
        return value

    def expr():
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    value = expr()
    assert pos == len(tokens), f"trailing tokens in {expression!r}"
    return value, numbers


def check_answer(problem: tasks.Problem) -> None:
    q, answer = problem.question, problem.answer
    if problem.family == "arithmetic":
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=\?", q).groups()
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    elif problem.family == "linear":
        a, b, c = map(int, re.fullmatch(r"(-?\d+)x([-+]\d+)=(-?\d+), x=\?", q).groups())
        assert a * int(answer) + b == c
    elif problem.family == "quadratic":
        p, q0 = re.fullmatch(r"x\^2(?:([-+]\d*)x)?([-+]\d+)?=0, x=\?", q).groups()
        p = 0 if p is None else int(p + "1" if p in "+-" else p)
        q0 = int(q0 or 0)
        roots = [int(r) for r in answer.split(", ")]
        assert all(r * r + p * r + q0 == 0 for r in roots)
        assert roots == sorted(set(roots))
        assert len(roots) == (1 if p * p == 4 * q0 else 2)
    elif problem.family == "countdown":
        target, shown = re.fullmatch(r"make (\d+) from ([\d,]+)", q).groups()
        assert problem.target == int(target)
        assert problem.numbers == tuple(int(n) for n in shown.split(","))
        value, used = evaluate(answer)
        assert value == problem.target
        assert sorted(used) == sorted(problem.numbers)
    else:
        raise AssertionError(f"unknown family {problem.family}")


def check_steps(solution: str) -> None:
    """Every step's all-numeric sides, as in '8+7=15' or 'x=15/3=5', are equal."""
    for step in solution.split(","):
        sides = [side for side in step.split("=") if re.fullmatch(r"[-+*/()\d]+", side)]
        values = {evaluate(side)[0] for side in sides}
        assert len(values) <= 1, f"the step {step!r} is wrong"


# ---------------------------------------------------------------------------------------
# Task families


def test_the_checker_rejects_wrong_answers():
    """A control: the independent checks fail on a wrong answer or a wrong step."""
    wrong = [
        tasks.Problem("arithmetic", "23*47=?", "1080"),
        tasks.Problem("linear", "3x-7=8, x=?", "4"),
        tasks.Problem("quadratic", "x^2-5x+6=0, x=?", "2"),
        tasks.Problem("countdown", "make 24 from 3,5,8", "3*8", (3, 5, 8), 24),
    ]
    for problem in wrong:
        with pytest.raises(AssertionError):
            check_answer(problem)
    with pytest.raises(AssertionError):
        check_steps("7+6=13,4+8+1=14")


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_every_generated_answer_and_worked_step_is_correct(difficulty):
    rng = np.random.default_rng(difficulty)
    for family in tasks.FAMILIES:
        for _ in range(150):
            problem = tasks.generate(family, rng, difficulty)
            check_answer(problem)
            check_steps(tasks.solution(problem))


def test_documents_follow_the_format_and_fit_a_small_context():
    rng = np.random.default_rng(0)
    for family in tasks.FAMILIES:
        problem = tasks.generate(family, rng)
        text = tasks.document(problem)
        match = re.fullmatch(r"Q: (.*)\n<think>(.*)</think><answer>(.*)</answer>", text)
        assert match.groups() == (problem.question, tasks.solution(problem), problem.answer)
        assert text.startswith(tasks.prompt(problem))
        assert len(text.encode()) <= 120


def test_quadratic_answers_are_canonical():
    rng = np.random.default_rng(1)
    problems = [tasks.generate("quadratic", rng) for _ in range(300)]
    answers = {p.answer for p in problems}
    assert any(", " not in a for a in answers) and any(", " in a for a in answers)
    for answer in answers:
        roots = [int(r) for r in answer.split(", ")]
        assert answer == ", ".join(map(str, sorted(set(roots))))


# ---------------------------------------------------------------------------------------
# The TFDS corpus


def test_builder_is_deterministic_to_the_byte(corpus_dir, tmp_path):
    from jaxllm.data import corpus

    corpus.prepare(str(tmp_path), seed=0, **SIZES)
    corpus.prepare(str(tmp_path / "other_seed"), seed=1, **SIZES)
    name = corpus.config_name(seed=0, **SIZES)

    def records(root, name):
        files = sorted((root / "jaxllm_reasoning" / name).rglob("*.tfrecord*"))
        return {f.name: f.read_bytes() for f in files}

    first, again = records(corpus_dir, name), records(tmp_path, name)
    assert len(first) == 3 and first == again
    other = records(tmp_path / "other_seed", corpus.config_name(seed=1, **SIZES))
    assert sorted(other.values()) != sorted(first.values())


def test_splits_have_their_sizes_and_no_held_out_question_is_in_train(corpus_dir):
    splits = {name: read_split(corpus_dir, name) for name in ("train", "validation", "test")}
    assert {k: len(v) for k, v in splits.items()} == {
        "train": SIZES["train_size"], "validation": SIZES["validation_size"],
        "test": SIZES["test_size"],
    }
    train = {p.question for p in splits["train"]}
    assert len(train) == len(splits["train"])
    for held_out in ("validation", "test"):
        assert not train & {p.question for p in splits[held_out]}
    families = collections.Counter(p.family for p in splits["train"])
    assert set(families) == set(tasks.FAMILIES)


def test_every_corpus_answer_and_worked_step_is_correct(corpus_dir):
    import tensorflow_datasets as tfds

    from jaxllm.data import corpus

    builder = corpus.prepare(str(corpus_dir), seed=0, **SIZES)
    for split in ("train", "validation", "test"):
        problems = []
        for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
            problems.append(corpus.from_example(example))
            check_answer(problems[-1])
            text = example["text"].decode()
            assert text == tasks.document(problems[-1])
            check_steps(re.search("<think>(.*)</think>", text).group(1))
        assert read_split(corpus_dir, split) == problems
        assert any(p.family == "countdown" and p.target and p.numbers for p in problems)


# ---------------------------------------------------------------------------------------
# Sources over TFDS


def reasoning_config(corpus_dir, **data) -> Config:
    return Config(data=DataConfig(**{"data_dir": str(corpus_dir), **SIZES, **data}))


def documents(source, batches: int, seq_len: int = 128) -> set[str]:
    """The texts of the documents in the first batches of a source."""
    stream = source.batches(2, seq_len)
    texts = [source.tokenizer.decode(row) for _ in range(batches) for row in next(stream)["inputs"]]
    return {doc for text in texts for doc in re.findall("<bos>(.*?)<eos>", text, re.DOTALL)}


def test_reasoning_source_packs_the_split_it_names(corpus_dir):
    source = make_source(reasoning_config(corpus_dir), split="validation")
    want = {tasks.document(p) for p in read_split(corpus_dir, "validation")}
    assert documents(source, batches=12) == want


def test_tool_documents_join_the_train_split_only_from_its_own_problems(corpus_dir):
    train = read_split(corpus_dir, "train")
    held_out = {p.question for split in ("validation", "test")
                for p in read_split(corpus_dir, split)}
    plain = make_source(reasoning_config(corpus_dir), split="train")
    source = make_source(reasoning_config(corpus_dir, tool_documents=6), split="train")
    assert len(source) == len(plain) + 6
    added = documents(source, batches=200) - {tasks.document(p) for p in train}
    assert 0 < len(added) <= 6 and all("</tool><result>" in doc for doc in added)
    questions = {re.match(r"Q: (.*)\n", doc)[1] for doc in added}
    assert questions <= {p.question for p in train} and not questions & held_out
    validation = make_source(reasoning_config(corpus_dir, tool_documents=6), split="validation")
    assert len(validation) == SIZES["validation_size"]


def test_any_tfds_dataset_by_name_split_and_feature(corpus_dir):
    from jaxllm.data import corpus

    name = f"jaxllm_reasoning/{corpus.config_name(seed=0, **SIZES)}"
    config = Config(data=DataConfig(source="tfds", name=name, split="test[:10]",
                                    text_key="question", data_dir=str(corpus_dir)))
    want = {p.question for p in read_split(corpus_dir, "test")[:10]}
    assert documents(make_source(config), batches=10, seq_len=64) == want


def test_reading_logs_no_tfds_dtype_deprecation(corpus_dir, monkeypatch, caplog):
    """TFDS's PartialDecoding logs "`FeatureConnector.dtype` is deprecated" through absl on
    every read (at most 10 times a process, so the test logs it on each call); other absl
    records still show."""
    from absl import logging as absl_logging
    from tensorflow_datasets.core.features import feature

    calls = []

    def log(class_name: str) -> None:
        calls.append(class_name)
        absl_logging.warning(f"`{class_name}.dtype` is deprecated.")
        absl_logging.warning("another absl warning")

    monkeypatch.setattr(feature, "log_tf_warning", log)
    readers.reasoning_texts(DataConfig(data_dir=str(corpus_dir), **SIZES), "test")
    messages = [r.getMessage() for r in caplog.records]
    assert calls and "another absl warning" in messages
    assert not [m for m in messages if "is deprecated" in m]


def test_processes_read_disjoint_shares_of_a_split(corpus_dir, monkeypatch):
    import jax
    from jax.experimental import multihost_utils

    data = DataConfig(data_dir=str(corpus_dir), **SIZES)
    whole = readers.reasoning_texts(data, "test")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    # One process plays both: the barrier of a multi-process corpus build has no peer here.
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
    shares = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        shares.append(readers.reasoning_texts(data, "test"))
    assert len(shares[0]) == len(shares[1]) == len(whole) // 2
    assert sorted(shares[0] + shares[1]) == sorted(whole)


@pytest.mark.parametrize(
    "data, field, message",
    [
        (dict(source="tfds", name="no_such_dataset"), "data.name", "not found"),
        (dict(source="tfds", name="jaxllm_reasoning"), "data.name", "is not prepared"),
        (dict(source="tfds", name="jaxllm_reasoning/NAME", split="test[5:5]"), "data.split",
         "corresponds to no data"),
        (dict(source="tfds", name="jaxllm_reasoning/NAME", split="dev"), "data.split",
         "has no split 'dev'"),
        (dict(source="tfds", name="jaxllm_reasoning/NAME", text_key="body"), "data.text_key",
         "no feature 'body'"),
        (dict(split="dev"), "data.split", "has splits"),
        (dict(data_dir="DIR/missing"), "data.data_dir", "does not exist"),
    ],
)
def test_bad_tfds_inputs_name_the_field(corpus_dir, data, field, message):
    from jaxllm.data import corpus

    name, root = corpus.config_name(seed=0, **SIZES), str(corpus_dir)
    data = {k: v.replace("NAME", name).replace("DIR", root) for k, v in data.items()}
    with pytest.raises(ConfigError, match=f"^{re.escape(field)}: .*{re.escape(message)}"):
        make_source(reasoning_config(corpus_dir, **data))
