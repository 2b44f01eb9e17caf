"""The in-repo arithmetic source and document packing."""

import re

import numpy as np

from jaxllm.data import ArithmeticSource, ByteTokenizer
from jaxllm.data.arithmetic import problems
from jaxllm.data.packing import pack


def test_packing_keeps_documents_whole_with_their_own_positions():
    rows = list(pack([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], seq_len=6, pad_id=0))
    first = rows[0]
    np.testing.assert_array_equal(first["inputs"], [1, 2, 3, 4, 5, 0])
    np.testing.assert_array_equal(first["segment_ids"], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(first["positions"], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(first["targets"], [2, 3, 4, 5, 0, 0])
    # no target crosses from one document into the next, nor into padding
    np.testing.assert_array_equal(first["loss_mask"], [1, 1, 0, 1, 0, 0])


def test_arithmetic_problems_are_correct_and_deterministic():
    stream = problems(seed=3)
    texts = [next(stream) for _ in range(200)]
    assert texts == [t for t, _ in zip(problems(seed=3), range(200))]
    for text in texts:
        a, op, b, answer = re.fullmatch(r"(\d+)([-+*])(\d+)=(-?\d+)", text).groups()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(answer)


def test_source_batches_have_the_promised_shapes_and_tokens():
    batch = next(ArithmeticSource(seed=0).batches(4, 64))
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    assert all(v.shape == (4, 64) for v in batch.values())
    tokenizer = ByteTokenizer()
    text = tokenizer.decode(batch["inputs"][0])
    assert text.startswith("<bos>") and "=" in text and "<eos>" in text
