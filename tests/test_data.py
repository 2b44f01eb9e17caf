"""Packing, document and arithmetic sources, text files, sharding and resumption."""

import re

import jax
import numpy as np
import pytest
from helpers import init_params, tiny_model

from jaxllm import Config, ConfigError, DataConfig
from jaxllm.config import validate
from jaxllm.data import ArithmeticSource, ByteTokenizer, DocumentSource, make_source, readers
from jaxllm.data.arithmetic import problems
from jaxllm.data.packing import pack, pack_row, plan_rows
from jaxllm.nn import Transformer


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


# ---------------------------------------------------------------------------------------
# Row plans and prompt masks


def test_row_plans_match_streaming_packing():
    rng = np.random.default_rng(0)
    docs = [list(range(1, n + 1)) for n in rng.integers(1, 13, size=40)]
    planned = [pack_row(docs[a:b], 16, 0) for a, b in plan_rows([len(d) for d in docs], 16)]
    streamed = list(pack(docs, 16, 0))
    assert len(planned) == len(streamed) + 1  # the stream holds back its last, open row
    for want, got in zip(streamed, planned):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_prompt_tokens_are_never_targets():
    row = pack_row([[1, 2, 3, 4], [5, 6, 7]], 9, 0, target_masks=[[0, 0, 1, 1], [1, 1, 1]])
    # targets: 2 3 4 | 5 6 7 | pad...; doc 1 masks its first two tokens as targets
    np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 0, 0])


# ---------------------------------------------------------------------------------------
# Document sources: epochs, resumption, prompt masking, sharding


TEXTS = [f"Q: {i}+{i}=?\n<think>{i}+{i}={2 * i}</think><answer>{2 * i}</answer>" for i in range(23)]


def docs_in_order(source, batch_size, seq_len, count, **kwargs) -> list[str]:
    """The documents of the stream, in order, until `count` of them are seen."""
    found, stream = [], source.batches(batch_size, seq_len, **kwargs)
    while len(found) < count:
        for row in next(stream)["inputs"]:
            found += re.findall("<bos>(.*?)<eos>", source.tokenizer.decode(row), re.DOTALL)
    return found[:count]


def test_each_epoch_visits_every_document_once_in_a_fresh_order():
    source = DocumentSource(TEXTS, ByteTokenizer(), seed=0)
    docs = docs_in_order(source, 2, 128, 3 * len(TEXTS))
    epochs = [docs[i:i + len(TEXTS)] for i in range(0, len(docs), len(TEXTS))]
    for epoch in epochs:
        assert sorted(epoch) == sorted(TEXTS)
    assert epochs[0] != epochs[1] != epochs[2]
    assert docs_in_order(DocumentSource(TEXTS, ByteTokenizer(), seed=0), 2, 128, 40) == docs[:40]
    assert docs_in_order(DocumentSource(TEXTS, ByteTokenizer(), seed=1), 2, 128, 40) != docs[:40]


def test_long_documents_are_cut_into_row_sized_pieces():
    tok = ByteTokenizer()
    text = "".join(chr(ord("a") + i % 26) for i in range(69))  # 71 tokens with bos and eos
    batch = next(DocumentSource([text], tok).batches(3, 32))  # one epoch: pieces 32, 32, 7
    real = batch["segment_ids"] > 0
    assert sorted(batch["inputs"][real]) == sorted([tok.bos_id, *tok.encode(text), tok.eos_id])
    assert sorted(real.sum(axis=1)) == [7, 32, 32]
    np.testing.assert_array_equal(batch["positions"][real], np.concatenate(
        [np.arange(n) for n in real.sum(axis=1)]))


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_resuming_at_start_continues_the_same_stream(mask_prompt):
    source = DocumentSource(TEXTS, ByteTokenizer(), seed=3)
    full = source.batches(4, 64, mask_prompt=mask_prompt)
    batches = [next(full) for _ in range(12)]  # about three epochs
    for start in (1, 5, 9):
        resumed = source.batches(4, 64, start=start, mask_prompt=mask_prompt)
        for want in batches[start:]:
            got = next(resumed)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_arithmetic_source_resumes_at_start():
    source = ArithmeticSource(seed=2)
    full = source.batches(4, 32)
    batches = [next(full) for _ in range(6)]
    resumed = source.batches(4, 32, start=4)
    for want in batches[4:]:
        np.testing.assert_array_equal(next(resumed)["inputs"], want["inputs"])


def test_mask_prompt_trains_only_past_the_think_token():
    tok = ByteTokenizer()
    batch = next(DocumentSource(TEXTS, tok).batches(4, 128, mask_prompt=True))
    plain = next(DocumentSource(TEXTS, tok).batches(4, 128))
    np.testing.assert_array_equal(batch["inputs"], plain["inputs"])
    for row in range(4):
        inputs, segments = batch["inputs"][row], batch["segment_ids"][row]
        want = np.zeros(128)
        for t in range(127):
            seg = segments[t]
            if seg and segments[t + 1] == seg:
                think = np.flatnonzero((segments == seg) & (inputs == tok.special["<think>"]))[0]
                want[t] = t + 1 > think
        np.testing.assert_array_equal(batch["loss_mask"][row], want)
        assert batch["loss_mask"][row].sum() < plain["loss_mask"][row].sum()


def test_processes_read_disjoint_rows_that_make_up_the_global_batch(monkeypatch):
    single = next(ArithmeticSource(seed=0).batches(8, 32, start=3))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        parts.append(next(ArithmeticSource(seed=0).batches(8, 32, start=3)))
    assert parts[0]["inputs"].shape == (4, 32)
    for key in single:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), single[key])
    with pytest.raises(ConfigError, match="^train.batch_size: 7 does not split over 2"):
        next(ArithmeticSource().batches(7, 32))


def test_text_files_shard_their_documents_over_processes(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\n\nthree\n")
    (tmp_path / "b.jsonl").write_text('{"body": "four"}\n{"body": "five"}\n')
    data = DataConfig(source="text", paths=f"{tmp_path}/a.txt, {tmp_path}/*.jsonl", text_key="body")
    assert readers.text_file_texts(data) == ["one", "two", "three", "four", "five"]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    shards = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        shards.append(readers.text_file_texts(data))
    assert shards == [["one", "three", "five"], ["two", "four"]]


def test_text_source_packs_its_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(f'{{"text": "{t}"}}' for t in ("ab", "cde")))
    source = make_source(Config(data=DataConfig(source="text", paths=str(tmp_path / "a.jsonl"))))
    assert sorted(docs_in_order(source, 2, 16, 2)) == ["ab", "cde"]


@pytest.mark.parametrize(
    "files, paths, split, message",
    [
        ({}, "*.txt", None, "^data.paths: '.*' matches no file"),
        ({"a.txt": "\n\n \n"}, "a.txt", None, "^data.paths: .* holds no documents"),
        ({"a.jsonl": '{"text": 1}\n'}, "a.jsonl", None, "^data.text_key: .*a.jsonl:1"),
        ({"a.jsonl": "{oops\n"}, "a.jsonl", None, "^data.paths: .*a.jsonl:1 is not JSON"),
        ({"a.txt": "x"}, "a.txt", "validation", "^data.split: text files are one split"),
    ],
)
def test_bad_text_inputs_name_the_field(tmp_path, files, paths, split, message):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    config = Config(data=DataConfig(source="text", paths=str(tmp_path / paths)))
    with pytest.raises(ConfigError, match=message):
        make_source(config, split=split)


@pytest.mark.parametrize(
    "data, message",
    [(dict(source="tfds"), "^data.name: source=tfds needs"),
     (dict(source="text"), "^data.paths: source=text needs"),
     (dict(difficulty=0), "^data.difficulty: must be positive")],
)
def test_data_config_is_checked_before_anything_runs(data, message):
    with pytest.raises(ConfigError, match=message):
        validate(Config(data=DataConfig(**data)))


# ---------------------------------------------------------------------------------------
# Packing isolation in the model


def test_a_documents_logits_ignore_the_other_documents_in_its_row():
    """Changing (and resizing) the first packed document leaves the second one's logits as
    they were, and equal to the second document packed alone."""
    model = Transformer(tiny_model())
    params = init_params(model)
    rng = np.random.default_rng(0)
    second = list(rng.integers(0, 256, size=9))
    rows = [pack_row([list(rng.integers(0, 256, size=n)), second], 24, 0) for n in (5, 11)]
    rows.append(pack_row([second], 24, 0))
    batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    logits = np.asarray(jax.jit(model.apply)(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
    ))
    np.testing.assert_allclose(logits[0, 5:14], logits[1, 11:20], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[1, 11:20], logits[2, :9], atol=1e-5, rtol=1e-5)
