"""Byte, Hugging Face and SentencePiece tokenizers behind one interface.

The Hugging Face and SentencePiece vocabularies are trained here, on a few lines, offline.
"""

import pytest

from jaxllm import Config, ConfigError, DataConfig, ModelConfig
from jaxllm.data import load_tokenizer, make_source
from jaxllm.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
LINES = [
    "Q: 347+586=?\n<think>7+6=13,4+8+1=13,3+5+1=9</think><answer>933</answer>",
    "Q: 3x-7=8, x=?\n<think>3x=8+7=15,x=15/3=5</think><answer>5</answer>",
    "Q: x^2-5x+6=0, x=?\n<think>r+s=5,r*s=6,(x-2)(x-3)=0</think><answer>2, 3</answer>",
    "Q: make 20 from 2,3,4\n<think>2+3=5,5*4=20</think><answer>(2+3)*4</answer>",
    "The quick brown fox jumps over the lazy dog. Ünïcödé and emoji: 🦊 too.",
]
ROUND_TRIPS = LINES + ["", "<think></think>", "a  b\n\nc", "<bos>x<eos><pad>"]


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(LINES * 4, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory) -> str:
    import sentencepiece

    prefix = tmp_path_factory.mktemp("sp") / "tiny"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES * 4), model_prefix=str(prefix), vocab_size=360,
        model_type="bpe", character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, user_defined_symbols=list(TAGS),
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", bos_piece="<bos>",
        eos_piece="<eos>", minloglevel=2,
    )
    return f"{prefix}.model"


def test_byte_tokenizer_maps_special_strings_to_single_ids():
    tok = ByteTokenizer()
    text = "Q: 1+1=?\n<think>1+1=2</think><answer>2</answer>"
    ids = tok.encode(text)
    s = tok.special
    want = (list(b"Q: 1+1=?\n") + [s["<think>"]] + list(b"1+1=2")
            + [s["</think>"], s["<answer>"], ord("2"), s["</answer>"]])
    assert ids == want
    assert tok.encode("é<eos>") == [0xC3, 0xA9, tok.eos_id]
    assert sorted(tok.special.values()) == list(range(256, tok.vocab_size))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)


@pytest.mark.parametrize("kind", ["byte", "hf", "sp"])
def test_round_trips_and_single_id_tags(kind, request):
    spec = "byte" if kind == "byte" else request.getfixturevalue(f"{kind}_path")
    tok = load_tokenizer(spec)
    for text in ROUND_TRIPS:
        assert tok.decode(tok.encode(text)) == text
    for tag in TAGS:
        assert tok.encode(tag) == [tok.special[tag]]
        assert tok.decode([tok.special[tag]]) == tag
    assert tok.decode([tok.bos_id, tok.eos_id]) == "<bos><eos>"
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert max(max(tok.encode(text)) for text in LINES) < tok.vocab_size


def test_hf_vocabulary_size_and_control_ids(hf_path):
    from tokenizers import Tokenizer

    tok = load_tokenizer(hf_path)
    reference = Tokenizer.from_file(hf_path)
    assert tok.vocab_size == reference.get_vocab_size()
    assert tok.bos_id == reference.token_to_id("<bos>")
    assert tok.encode(LINES[0]) == reference.encode(LINES[0]).ids


def test_sentencepiece_control_ids_come_from_the_model(sp_path):
    tok = load_tokenizer(sp_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.vocab_size == 360


@pytest.mark.parametrize(
    "spec, message",
    [("vocab.txt", "neither 'byte'"), ("missing/tokenizer.json", "does not exist")],
)
def test_bad_tokenizer_specs_name_the_field(spec, message):
    config = Config(data=DataConfig(source="arithmetic", tokenizer=spec))
    with pytest.raises(ConfigError, match=f"^data.tokenizer: .*{message}"):
        make_source(config)


def test_a_vocabulary_larger_than_the_model_is_refused(hf_path):
    config = Config(model=ModelConfig(vocab_size=64), data=DataConfig(tokenizer=hf_path))
    with pytest.raises(ConfigError, match="^model.vocab_size: 64 is smaller"):
        make_source(config)
