"""Hugging Face conversion against `transformers` itself: for each family a tiny randomly
initialised HF model is saved, imported, run and exported back."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.cli import main
from jaxllm.convert import ConversionError
from jaxllm.convert.hf_config import check_exportable, from_hf
from jaxllm.convert.hf_export import write_hf
from jaxllm.convert.hf_files import SafetensorsReader
from jaxllm.convert.hf_import import load_variables
from jaxllm.infer.sampler import generate
from jaxllm.nn import Transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)
FAMILIES = {
    "llama": ("Llama", dict(rope_parameters=dict(  # Llama 3.1 scaling
        rope_type="llama3", rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral": ("Mistral", dict(sliding_window=6)),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3", {}),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=4, **MOE)),
    "deepseek_v3": ("DeepseekV3", dict(
        num_key_value_heads=4, n_routed_experts=8, n_group=2,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1,
        rope_parameters=dict(rope_type="yarn", rope_theta=10_000.0, factor=4.0,
                             original_max_position_embeddings=8, mscale=1.0,
                             mscale_all_dim=1.0), **MOE)),
}
PROMPT, NEW_TOKENS = 8, 20


def tiny_hf_model(kind: str, **changes):
    """A seeded random HF model of family `kind` (its config with `changes`), with norm
    scales and biases away from their init values so that a misplaced one shows."""
    name, extra = FAMILIES[kind]
    config = getattr(transformers, f"{name}Config")(**{**COMMON, **extra, **changes})
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("norm.weight"):
                value.uniform_(0.5, 1.5)
            elif key.endswith(("bias", "e_score_correction_bias")):
                value.uniform_(0.0, 0.1)
    return model


def one_device_mesh(model_cfg):
    config = config_lib.Config(model=model_cfg, mesh=config_lib.MeshConfig(data=1))
    return parallel.make_mesh(config, jax.devices()[:1])


def hf_greedy(model, tokens: np.ndarray) -> np.ndarray:
    model.generation_config.eos_token_id = None  # our sampler runs all NEW_TOKENS too
    ids = torch.tensor(tokens)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
    return out[:, tokens.shape[1]:].numpy()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_import_matches_transformers_and_exports_back(kind, tmp_path):
    check_round_trip(tiny_hf_model(kind), kind, tmp_path)


def test_mla_value_heads_narrower_than_key_heads_round_trip(tmp_path):
    """kv_b_proj holds key_up and value_up of different widths per head."""
    hf = tiny_hf_model("deepseek_v3", qk_nope_head_dim=16, v_head_dim=12)
    check_round_trip(hf, "deepseek_v3", tmp_path)


def check_round_trip(hf, kind: str, tmp_path) -> None:
    """Import: logits within 1e-4 and 20 identical greedy tokens; export: transformers
    loads the same tensors back, so its logits are identical."""
    hf.save_pretrained(tmp_path / "hf")
    imported = json.loads((tmp_path / "hf" / "config.json").read_text())
    model_cfg = from_hf(imported)
    # A sharded mesh: each device's shard is assembled from the pieces it covers.
    mesh_cfg = config_lib.MeshConfig(data=1, fsdp=2, tensor=2, expert=2)
    mesh = parallel.make_mesh(config_lib.Config(model=model_cfg, mesh=mesh_cfg))
    variables = load_variables(tmp_path / "hf", model_cfg, mesh, log=lambda _: None)
    variables = jax.device_put(variables, jax.devices()[0])
    tokens = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, 16))

    model = Transformer(model_cfg)
    logits = jax.jit(model.apply)(variables, jnp.asarray(tokens))
    np.testing.assert_allclose(logits, hf_logits(hf, tokens), atol=1e-4, rtol=0)
    ours = generate(model, variables["params"], tokens[:, :PROMPT].tolist(),
                    max_new_tokens=NEW_TOKENS, temperature=0.0, moe_bias=variables.get("moe_bias"))
    np.testing.assert_array_equal(ours.tokens, hf_greedy(hf, tokens[:, :PROMPT]))

    write_hf(variables, model_cfg, kind, tmp_path / "out", imported)
    back = type(hf).from_pretrained(tmp_path / "out").eval()
    expected = hf.state_dict()
    if kind == "qwen2":  # tied: the export writes the head out
        assert hf.config.tie_word_embeddings and not back.config.tie_word_embeddings
    for key, value in back.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), expected[key].numpy(), err_msg=key)
    np.testing.assert_array_equal(hf_logits(back, tokens), hf_logits(hf, tokens))


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXT = "the cat sat on the mat and the dog sat on the log"


def save_tiny_tokenizer(directory) -> None:
    """A word-piece BPE of under 128 tokens with a chat template, saved as transformers does."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.BPEDecoder()
    special = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=100, special_tokens=special,
                                             end_of_word_suffix="</w>")
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(directory)


def test_cli_round_trip_with_tokenizer_and_chat_template(tmp_path, capsys):
    """`jaxllm convert hf-import` then `hf-export` through the orbax checkpoint: the same
    tensors come back; the tokenizer and its chat template agree with transformers'."""
    from jaxllm.data.tokenizer import chat_prompt, load_tokenizer
    from jaxllm.train.run import read_config

    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    save_tiny_tokenizer(tmp_path / "hf")
    work, out = tmp_path / "work", tmp_path / "out"
    assert main(["convert", "hf-import", str(tmp_path / "hf"), "--out", str(work)]) == 0
    assert main(["convert", "hf-export", str(work), "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                 "--out", str(out)]) == 0  # restored sharded, read piecewise
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = hf.state_dict()
    for key, value in back.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), expected[key].numpy(), err_msg=key)

    ours = load_tokenizer(read_config(work).data.tokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ids = ours.encode(TEXT)
    assert ids == theirs.encode(TEXT, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids) == TEXT
    chat = theirs.apply_chat_template([{"role": "user", "content": "the cat"}],
                                      add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if hasattr(chat, "keys") else chat  # a BatchEncoding or ids
    assert chat_prompt(ours, "the cat") == list(chat)
    assert chat_prompt(ours, "the cat")[0] == ours.bos_id == theirs.bos_token_id


def test_pickled_weights_are_refused_unread(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (hf_dir / "pytorch_model.bin").write_bytes(b"not a pickle; never opened")
    assert main(["convert", "hf-import", str(hf_dir), "--out", str(tmp_path / "w")]) == 2
    error = capsys.readouterr().err
    assert "pytorch_model.bin" in error and "save_pretrained" in error


def test_unsupported_architecture_and_mismatched_tensors_are_named(tmp_path):
    with pytest.raises(ConversionError, match="model_type 'gpt2' is not supported"):
        from_hf({"model_type": "gpt2"})
    llama = tiny_hf_model("llama").config.to_dict()
    rope = {k: v for k, v in llama["rope_parameters"].items() if k != "low_freq_factor"}
    with pytest.raises(ConversionError, match="rope_type 'llama3' needs low_freq_factor"):
        from_hf({**llama, "rope_parameters": rope})
    yarn = {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0}
    imported = from_hf({**llama, "rope_parameters": yarn, "max_position_embeddings": 96})
    assert imported.attention.rope_original_len == 96  # max_position_embeddings
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    model_cfg = from_hf({**config, "intermediate_size": 48})
    mesh = one_device_mesh(model_cfg)
    with pytest.raises(ConversionError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape "
                                              r"\[64, 32\]; the model config needs \[48, 32\]"):
        load_variables(tmp_path, model_cfg, mesh)
    with pytest.raises(ConversionError, match="'lm_head.bias' is missing"):
        SafetensorsReader(tmp_path).get("lm_head.bias")


def test_layers_past_the_stack_are_skipped_with_a_warning(tmp_path):
    """DeepSeek-V3 checkpoints carry the multi-token-prediction module as extra layers."""
    from safetensors.numpy import save_file

    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path)
    save_file({"model.layers.2.eh_proj.weight": np.zeros((4, 4), np.float32)},
              tmp_path / "mtp.safetensors")
    model_cfg = from_hf(json.loads((tmp_path / "config.json").read_text()))
    mesh = one_device_mesh(model_cfg)
    logs = []
    load_variables(tmp_path, model_cfg, mesh, log=logs.append)
    assert logs == [("warning: skipped 1 tensors of layers >= num_hidden_layers=2 (the "
                     "multi-token-prediction module), which the model does not use")]


def test_configs_that_transformers_reads_otherwise_are_refused(tmp_path):
    """DeepSeek YaRN without mscale keys (HF then scales only the rotary part), and shared
    experts of another width than HF's moe_intermediate_size."""
    tiny_hf_model("deepseek_v3").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = {k: v for k, v in config["rope_parameters"].items() if k != "mscale"}
    with pytest.raises(ConversionError, match="mscale = mscale_all_dim = 1, got None and 1"):
        from_hf({**config, "rope_parameters": rope})
    model = from_hf(config)
    wider = dataclasses.replace(model, moe=dataclasses.replace(model.moe, shared_expert_dim=32))
    with pytest.raises(ConversionError, match="shared_expert_dim must equal expert_dim"):
        check_exportable(wider, "deepseek_v3")
