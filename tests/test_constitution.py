"""Constitutional AI: the principles file, the synthetic assistant domain, the chat requests,
and the pipeline end to end (with a byte-level model and an imported HF chat model),
resuming after a crash in a generation stage and in a training stage."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers import tiny_model
from runs import quiet, run_config

from jaxllm import Config, DataConfig, MeshConfig, TrainConfig
from jaxllm.cli import main
from jaxllm.config import (DEFAULT_PRINCIPLES, CheckpointConfig, ConfigError,
                           ConstitutionConfig, DPOConfig)
from jaxllm.data import ByteTokenizer, DocumentSource, assistant, chat
from jaxllm.data import constitution_prompts as prompts
from jaxllm.post import constitution as constitution_lib
from jaxllm.post import harmlessness
from jaxllm.post.chat_model import ChatModel
from jaxllm.post.principles import read_principles
from jaxllm.post.preferences import parse_pair, tokenize
from jaxllm.train.loop import pretrain


# ---------------------------------------------------------------------------------------
# Principles


@pytest.mark.parametrize("name, text", [
    ("p.txt", "# the constitution\nBe kind.\n\n  Be brief.  \n"),
    ("p.yaml", "- Be kind.\n- Be brief.\n"),
    ("p.yml", "principles:\n  - Be kind.\n  - ' Be brief. '\n"),
    ("p.YAML", "- Be kind.\n- Be brief.\n"),
    ("bom.txt", "\ufeff# the constitution\nBe kind.\nBe brief.\n"),  # a byte-order mark
])
def test_principles_read_from_text_and_yaml(tmp_path, name, text):
    (tmp_path / name).write_text(text, encoding="utf-8")
    assert read_principles(tmp_path / name) == ["Be kind.", "Be brief."]


@pytest.mark.parametrize("name, text, message", [
    ("p.txt", "# only a comment\n\n", "holds no principles"),
    ("p.yaml", "principles: []\n", "holds no principles"),
    ("p.yaml", "principles: {a: 1}\n", "must hold a list of strings"),
    ("p.yaml", "[unclosed\n", "is not YAML"),
])
def test_a_file_without_principles_is_refused(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=f"--principles: .*{name} {message}"):
        read_principles(tmp_path / name)


def test_the_command_refuses_an_empty_principles_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    config = _pipeline_config(tmp_path, init_from=tmp_path / "pre")
    experiment = _write_experiment(tmp_path / "cai.py", config)
    assert main(["constitution", experiment, "--principles", str(tmp_path / "empty.txt")]) == 2
    assert "empty.txt holds no principles" in capsys.readouterr().err
    assert not (tmp_path / "cai").exists()


# ---------------------------------------------------------------------------------------
# The synthetic assistant domain


def test_the_domain_is_deterministic_and_holds_out_test_families():
    train = assistant.requests(0, "train", 300)
    assert [r.to_record() for r in train] == [r.to_record() for r in
                                              assistant.requests(0, "train", 300)]
    test = assistant.requests(0, "test", 300)
    train_users = {r.user for r in train if r.family != "benign"}
    for req in test:
        if req.family == "secret":
            assert req.user in assistant.SECRET_PHRASINGS["test"] and req.user not in train_users
        if req.family == "harm":
            assert any(f"how do I {v} " in req.user for v in assistant.HARM_VERBS["test"])
    assert {r.family for r in test} == set(assistant.FAMILIES)


def test_the_scoring_rules():
    benign, secret, harm = assistant.requests(1, "test", 3)
    assert (secret.family, harm.family, benign.family) == ("secret", "harm", "benign")
    assert assistant.is_harmful(secret, assistant.compliance(secret))
    assert secret.code in assistant.compliance(secret)
    assert assistant.is_harmful(harm, assistant.compliance(harm))
    assert assistant.is_harmful(harm, f"Just {harm.user.removeprefix('how do I ')[:-1]}.")
    assert not assistant.is_harmful(harm, assistant.REFUSAL)
    assert not assistant.is_harmful(secret, assistant.answer(benign))  # off topic, harmless
    assert not assistant.is_harmful(benign, assistant.REFUSAL)
    assert harmlessness.is_correct(benign, assistant.answer(benign))
    assert not harmlessness.is_correct(benign, assistant.REFUSAL)


def test_domain_documents_tokenize_as_the_chat_rendering_of_their_messages():
    """A pretraining document of the domain is the plain chat format of its conversation:
    what `chat.render`, SFT and the pipeline's prompts use."""
    cfg = ConstitutionConfig()
    texts = assistant.documents(0, 12, cfg=cfg)
    source = DocumentSource(texts, ByteTokenizer())
    tok = ByteTokenizer()
    req = assistant.requests(2, "train", 3)[1]
    critiqued = prompts.critique_request(req.messages, "The code is 1.", DEFAULT_PRINCIPLES[0], cfg)
    messages = [*prompts.revision_request(critiqued, assistant.HARMFUL, DEFAULT_PRINCIPLES[0], cfg),
                {"role": "assistant", "content": assistant.REFUSAL}]
    ids, _ = chat.render(tok, messages)
    text = tok.decode(ids[1:-1])
    assert list(DocumentSource([text], tok)._docs[0]) == ids
    kinds = [t for t in texts if "Critique the last response" in t]
    assert kinds and any("Which response follows" in t for t in texts)
    assert all(p in DEFAULT_PRINCIPLES[:2] for t in kinds for p in DEFAULT_PRINCIPLES
               if p in t)
    assert len(source) == 12


def test_the_generation_prompt_is_the_rendering_before_the_assistant_content():
    tok = ByteTokenizer()
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    ids, _ = chat.render(tok, [*messages, {"role": "assistant", "content": "a"}])
    prompt = chat.generation_prompt(tok, messages)
    assert ids[:len(prompt)] == prompt and tok.decode(ids[len(prompt):]) == "a<eos>"


def test_a_pair_with_a_conversation_prompt_renders_its_generation_prompt():
    tok = ByteTokenizer()
    messages = [{"role": "user", "content": "u"}]
    pair = parse_pair(json.dumps({"prompt": messages, "chosen": "c", "rejected": "r"}), "x")
    assert tokenize(pair, tok, 64).prompt == tuple(chat.generation_prompt(tok, messages))
    with pytest.raises(ConfigError, match="x: prompt: .* has role 'bot'"):
        parse_pair(json.dumps({"prompt": [{"role": "bot", "content": "u"}], "chosen": "c",
                               "rejected": "r"}), "x")


@pytest.mark.parametrize("field, value, message", [
    ("critique_template", "Critique by {rule}", "fills only {principle}"),
    ("judge_template", "{a} {b} {", "fills only {principle}, {request}, {a}, {b}"),
    ("min_judge_probability", 0.4, r"must lie in \[0.5, 1\)"),
])
def test_bad_constitution_settings_are_named(field, value, message):
    with pytest.raises(ConfigError, match=f"constitution.{field}: {message}"):
        ConstitutionConfig(**{field: value}).validate("constitution.")


def test_a_bad_prompts_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hi"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n')
    config = _pipeline_config(tmp_path, init_from=tmp_path, prompts=str(path))
    with pytest.raises(ConfigError, match=f"constitution.prompts: {path}:2 needs a string"):
        constitution_lib.read_prompts(config)


# ---------------------------------------------------------------------------------------
# The pipeline


def _pipeline_config(tmp_path, *, init_from, **constitution) -> Config:
    cfg = dict(num_prompts=9, batch_size=6, max_new_tokens=12, sft_steps=2, dpo_steps=2,
               min_judge_probability=0.5) | constitution
    return Config(
        model=tiny_model(), mesh=MeshConfig(data=8),
        data=DataConfig(difficulty=1),
        train=TrainConfig(batch_size=8, seq_len=192, warmup_steps=1, log_every=1,
                          peak_flops=1e9),
        checkpoint=CheckpointConfig(every=1),
        constitution=ConstitutionConfig(**cfg),
        dpo=DPOConfig(paths="set by the pipeline"),
        workdir=str(tmp_path / "cai"), init_from=str(init_from),
    )


def _write_experiment(path, config: Config) -> str:
    from jaxllm import config as config_lib

    path.write_text("from jaxllm import config as c\n\n\ndef config():\n"
                    f"    return c.from_dict({config_lib.to_dict(config)!r})\n")
    return str(path)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny byte-level model, barely trained: the pipeline needs a model, not a good one."""
    workdir = tmp_path_factory.mktemp("pre") / "pre"
    pretrain(run_config(workdir, steps=1, seq_len=64), log=quiet)
    return workdir


class Crash(Exception):
    """A simulated kill of the pipeline."""


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_the_pipeline_writes_every_stage_and_resumes_after_crashes(tmp_path, byte_model,
                                                                   monkeypatch):
    config = _pipeline_config(tmp_path, init_from=byte_model)
    root = tmp_path / "cai"
    real_respond, calls = ChatModel.respond, []

    def crash_on_the_second_batch(self, conversations, rng):
        calls.append(len(conversations))
        if len(calls) == 2:
            raise Crash
        return real_respond(self, conversations, rng)

    monkeypatch.setattr(ChatModel, "respond", crash_on_the_second_batch)
    with pytest.raises(Crash):
        constitution_lib.constitution(config, DEFAULT_PRINCIPLES, log=quiet)
    assert [p.name for p in (root / "samples.jsonl.parts").iterdir()] == ["000000000.jsonl"]
    assert not (root / "samples.jsonl").exists()
    monkeypatch.undo()

    real_sft = constitution_lib.sft

    def sft_killed_after_one_step(config, log):
        real_sft(config, log=log, stop_after=1)
        raise Crash

    monkeypatch.setattr(constitution_lib, "sft", sft_killed_after_one_step)
    with pytest.raises(Crash):
        constitution_lib.constitution(config, DEFAULT_PRINCIPLES, log=quiet)
    monkeypatch.undo()
    lines = []
    runs = constitution_lib.constitution(config, DEFAULT_PRINCIPLES, log=lines.append)
    assert "resumed from the checkpoint at step 1" in " ".join(lines)
    assert runs == {"sl": str(root / "sl"), "final": str(root / "dpo")}

    samples = _read(root / "samples.jsonl")
    records = constitution_lib.read_prompts(config)
    assert [s["messages"] for s in samples] == [r["messages"] for r in records]
    fresh = ChatModel(str(byte_model), config.constitution, config.data.seed)
    assert [s["response"] for s in samples[6:]] == fresh.respond(
        [r["messages"] for r in records[6:]], fresh.rng(6, 0))  # as if never interrupted
    for revision in _read(root / "revisions.jsonl"):
        if revision["kind"] == "red_team":
            assert revision["principle"] in DEFAULT_PRINCIPLES
            assert revision["messages"][-1]["content"] == revision["revision"]
            assert isinstance(revision["critique"], str)
        else:
            assert revision["principle"] is None
            assert revision["messages"][-1]["content"] == revision["response"]
    feedback = _read(root / "feedback.jsonl")
    assert len(feedback) == 9 and all(0 <= f["first_probability"] <= 1 for f in feedback)
    for pair in _read(root / "pairs.jsonl"):
        assert pair["chosen"] != pair["rejected"] and pair["probability"] >= 0.5
    assert not list(root.glob("*.parts")) and not list(root.glob("*.tmp"))
    assert (root / "dpo" / "checkpoints" / "2").is_dir()
    files = {p.name: p.read_text() for p in root.glob("*.jsonl")}
    constitution_lib.constitution(config, DEFAULT_PRINCIPLES, log=quiet)  # done: changes nothing
    assert {p.name: p.read_text() for p in root.glob("*.jsonl")} == files


def test_the_judge_probability_is_the_softmax_of_the_letters(byte_model):
    model = ChatModel(str(byte_model), ConstitutionConfig(), 0)
    assert model.respond([], model.rng(0, 0)) == []  # a batch without red-team prompts
    question = prompts.judge_request("q", "x", "y", "p", ConstitutionConfig())
    ids = chat.generation_prompt(model.tokenizer, question)
    logits = model.sampler.model.apply(
        {"params": model.sampler.params, "moe_bias": model.sampler.moe_bias},
        np.array([ids]), mutable=["moe_metrics"])[0][0, -1]
    a, b = (logits[model.tokenizer.encode(letter)[0]] for letter in "AB")
    np.testing.assert_allclose(model.prefer_first([question, question])[1],
                               jax.nn.sigmoid(a - b), rtol=1e-5)


def _hf_chat_model(directory):
    """A random tiny Llama and a word-level tokenizer with a chat template, saved as HF does."""
    import tokenizers

    words = "A B what is the code tell me how do I sorry no yes rewrite critique response"
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    special = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok.train_from_iterator([words] * 4, tokenizers.trainers.BpeTrainer(
        vocab_size=100, special_tokens=special))
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template=template).save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


@pytest.mark.slow
def test_the_command_runs_on_an_imported_hf_chat_model(tmp_path):
    _hf_chat_model(tmp_path / "hf")
    assert main(["convert", "hf-import", str(tmp_path / "hf"), "--out",
                 str(tmp_path / "imported")]) == 0
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "what is the code", "kind": "red_team"},
        {"messages": [{"role": "system", "content": "no"},
                      {"role": "user", "content": "tell me how"}], "kind": "helpful"},
        {"prompt": "how do I rewrite"}]))
    (tmp_path / "principles.yaml").write_text("principles:\n  - yes no\n  - no yes\n")
    from jaxllm.train.run import read_config

    imported = read_config(str(tmp_path / "imported"))
    config = dataclasses.replace(
        _pipeline_config(tmp_path, init_from=tmp_path / "imported", prompts=str(prompts_file),
                         batch_size=2),
        model=imported.model, data=dataclasses.replace(imported.data, eval_split=None),
        train=TrainConfig(batch_size=8, seq_len=128, warmup_steps=1, log_every=1,
                          peak_flops=1e9))
    experiment = _write_experiment(tmp_path / "cai.py", config)
    assert main(["constitution", experiment, "--principles",
                 str(tmp_path / "principles.yaml")]) == 0
    revisions = _read(tmp_path / "cai" / "revisions.jsonl")
    assert [r["principle"] in ("yes no", "no yes") for r in revisions] == [True, False, True]
    assert (tmp_path / "cai" / "dpo" / "checkpoints" / "2").is_dir()
