"""Supervised fine-tuning: assistant masks against `transformers`, the plain format, packing,
malformed records, and `jaxllm sft` end to end from a pretrained workdir."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from helpers import dense_loss_sums, tiny_model
from runs import quiet, run_config

from jaxllm import Config, ConfigError, DataConfig, MeshConfig, TrainConfig, config as config_lib
from jaxllm.cli import main
from jaxllm.data import ByteTokenizer, ChatSource, chat, load_tokenizer, make_source
from jaxllm.data.tokenizer import render_chat
from jaxllm.nn import Transformer
from jaxllm.train.loop import pretrain
from jaxllm.train.metrics import read_jsonl
from jaxllm.train.run import load_run
from jaxllm.train.sft import sft

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|> "
    "{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %} "
    "{% else %}<|{{ m['role'] }}|> {{ m['content'] }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
PLAIN_TEMPLATE = TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
WORDS = "the cat sat on the mat and the dog sat on the log be brief what did"
CONVERSATIONS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what sat"},
     {"role": "assistant", "content": "the cat sat"}, {"role": "user", "content": "on what"},
     {"role": "assistant", "content": "on the mat"}],
    [{"role": "user", "content": "what did the dog"},
     {"role": "assistant", "content": "the dog sat on the log"}],
]


def hf_tokenizer(directory: Path, template: str) -> str:
    """A word-level BPE with special tokens and `template`, saved as transformers does."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    special = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok.train_from_iterator([WORDS] * 4, tokenizers.trainers.BpeTrainer(
        vocab_size=120, special_tokens=special))
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template=template).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_generation_blocks_mask_what_transformers_masks(tmp_path, messages):
    directory = hf_tokenizer(tmp_path, TEMPLATE)
    theirs = transformers.AutoTokenizer.from_pretrained(directory).apply_chat_template(
        messages, tokenize=True, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = chat.render(load_tokenizer(f"{directory}/tokenizer.json"), messages)
    assert ids == list(theirs["input_ids"])
    assert [int(m) for m in mask] == list(theirs["assistant_masks"])
    assert sum(mask) > 0


def test_templates_render_as_transformers_renders_them(tmp_path):
    """Its `tojson` (no HTML or ASCII escapes), `strftime_now`, `tools` None, and only the
    special tokens that are set (here no pad token)."""
    template = ("{% if tools is not none %}[TOOLS]{% endif %}{{ pad_token }}"
                "{{ strftime_now('%Y') }}{% for m in messages %} {{ m['content'] | tojson }}"
                "{% endfor %}")
    directory = hf_tokenizer(tmp_path, template)
    messages = [{"role": "user", "content": "<b>café</b> & \"tea\""}]
    theirs = transformers.AutoTokenizer.from_pretrained(directory).apply_chat_template(
        messages, tokenize=False)
    tokenizer = load_tokenizer(f"{directory}/tokenizer.json")
    assert render_chat(template, messages, **tokenizer.chat_tokens) == theirs
    assert theirs.endswith(' "<b>café</b> & \\"tea\\""')


def test_a_template_without_generation_blocks_masks_what_each_turn_adds(tmp_path):
    """Without `{% generation %}`, a turn's tokens are what it adds to the prompt before it:
    here the same tokens as the generation blocks mark."""
    marked = load_tokenizer(f"{hf_tokenizer(tmp_path / 'marked', TEMPLATE)}/tokenizer.json")
    plain = load_tokenizer(f"{hf_tokenizer(tmp_path / 'plain', PLAIN_TEMPLATE)}/tokenizer.json")
    for messages in CONVERSATIONS:
        assert chat.render(plain, messages) == chat.render(marked, messages)
    ids, mask = chat.render(plain, CONVERSATIONS[0])
    eos = [plain.eos_id]
    assert [i for i, m in zip(ids, mask) if m] == (plain.encode("the cat sat") + eos
                                                   + plain.encode("on the mat") + eos)


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    last_only = PLAIN_TEMPLATE.replace("{{ m['content'] }}{{ eos_token }}",
                                       "{% if loop.last %}{{ m['content'] }}{% endif %}")
    tokenizer = load_tokenizer(f"{hf_tokenizer(tmp_path, last_only)}/tokenizer.json")
    with pytest.raises(ValueError, match="assistant turn 2 differently.*{% generation %}"):
        chat.render(tokenizer, CONVERSATIONS[0])


def test_the_plain_format_masks_assistant_content_and_eos():
    tok = ByteTokenizer()
    ids, mask = chat.render(tok, CONVERSATIONS[0])
    assert tok.decode(ids) == ("<bos>System: be brief\nUser: what sat\nAssistant: the cat sat<eos>"
                               "User: on what\nAssistant: on the mat<eos>")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "the cat sat<eos>on the mat<eos>"
    record = chat.conversation({"prompt": "what did the dog", "response": "the dog sat on the log"})
    assert record == CONVERSATIONS[1]


def test_packed_rows_train_on_assistant_targets_within_their_own_conversation():
    tok = ByteTokenizer()
    conversations = [[{"role": "user", "content": f"{i}+{i}?"},
                      {"role": "assistant", "content": str(2 * i)}] for i in range(12)]
    rendered = {tuple(ids): mask for ids, mask in (chat.render(tok, c) for c in conversations)}
    batch = next(ChatSource(conversations, tok).batches(4, 64))
    for row in range(4):
        segments = batch["segment_ids"][row]
        assert segments.max() > 1  # several conversations share the row
        for segment in range(1, segments.max() + 1):
            where = np.flatnonzero(segments == segment)
            mask = rendered[tuple(batch["inputs"][row][where])]  # whole, one conversation
            # target t is token t + 1 of the same conversation; none crosses into the next
            np.testing.assert_array_equal(batch["loss_mask"][row][where], [*mask[1:], False])
        assert not batch["loss_mask"][row][segments == 0].any()


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "response": ', "is not JSON"),
    ('{"prompt": "a"}', "'response' must be a string"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', "messages\\[0\\] has role 'bot'"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant turn"),
])
def test_malformed_records_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(f'{{"prompt": "q", "response": "r"}}\n\n{line}\n')
    config = Config(data=DataConfig(source="chat", paths=str(path), eval_split=None))
    with pytest.raises(ConfigError, match=f"data.paths: {re.escape(str(path))}:3\\b.*{message}"):
        make_source(config)


def test_sft_needs_chat_data():
    with pytest.raises(ConfigError, match="data.source: SFT trains on chat records"):
        sft(Config())
    with pytest.raises(ConfigError, match="data.paths: source=chat reads"):
        config_lib.validate(Config(data=DataConfig(source="chat", eval_split=None)))


def write_experiment(path: Path, config: Config) -> str:
    """An experiment file whose config() returns `config`."""
    path.write_text(f"from jaxllm.config import *\n\n\ndef config():\n    return {config!r}\n")
    return str(path)


def records() -> tuple[list[dict], set[str]]:
    """Prompt/response and multi-turn chat records, and the assistant text of each."""
    pairs = [{"prompt": f"{i}+{i}=?", "response": f"{2 * i}"} for i in range(12)]
    chats = [{"messages": [{"role": "system", "content": "Add."},
                           {"role": "user", "content": f"{i}+1"},
                           {"role": "assistant", "content": f"{i + 1}"},
                           {"role": "user", "content": "+2"},
                           {"role": "assistant", "content": f"{i + 3}"}]} for i in range(12)]
    answers = {f"{2 * i}<eos>" for i in range(12)} | {f"{i + 1}<eos>{i + 3}<eos>"
                                                       for i in range(12)}
    return pairs + chats, answers


@pytest.mark.slow
def test_jaxllm_sft_from_a_pretrained_workdir(tmp_path, capsys):
    """`jaxllm sft` starts from a pretraining run's weights; its first loss is the loss of
    those weights on the assistant targets alone, and it drops."""
    pretrain(run_config(tmp_path / "pre", steps=1, seq_len=64), log=quiet)
    lines, answers = records()
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = Config(
        model=tiny_model(), mesh=MeshConfig(data=8),
        data=DataConfig(source="chat", paths=str(tmp_path / "chat.jsonl"), eval_split=None),
        train=TrainConfig(steps=10, batch_size=8, seq_len=64, warmup_steps=2, log_every=1,
                          eval_every=0, peak_flops=1e9),
        workdir=str(tmp_path / "sft"), init_from=str(tmp_path / "pre"),
    )
    assert main(["sft", write_experiment(tmp_path / "sft.py", config)]) == 0
    assert f"starting from the weights in {tmp_path / 'pre'}" in capsys.readouterr().out
    losses = [r["loss"] for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 10 and losses[-1] < 0.7 * losses[0]

    batch = next(make_source(config).batches(8, 64))
    tok = ByteTokenizer()
    for row in range(8):  # every conversation trains on exactly its assistant text
        for segment in range(1, batch["segment_ids"][row].max() + 1):
            trained = (batch["segment_ids"][row] == segment) & (batch["loss_mask"][row] > 0)
            assert tok.decode(batch["targets"][row][trained]) in answers
    _, model, state = load_run(str(tmp_path / "pre"))
    _, (nll, tokens) = dense_loss_sums(state.params, jax.tree.map(jnp.asarray, batch),
                                       Transformer(model.config), 0.0)
    assert tokens == batch["loss_mask"].sum()
    np.testing.assert_allclose(losses[0], nll / tokens, rtol=1e-5)


def test_a_malformed_record_stops_jaxllm_sft_before_it_writes(tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"prompt": "q", "response": "r"}\n{"prompt": "q"}\n')
    config = Config(data=DataConfig(source="chat", paths=str(path), eval_split=None),
                    workdir=str(tmp_path / "run"))
    assert main(["sft", write_experiment(tmp_path / "sft.py", config)]) == 2
    assert f"{path}:2: 'response' must be a string" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
