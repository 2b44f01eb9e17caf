"""Runs with images: the config cross-checks, `jaxllm generate --image`, and `jaxllm pretrain`
of the tiny early-fusion experiment with resume."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import tiny_model
from jaxllm import Config, DataConfig, MeshConfig, ModelConfig, parallel
from jaxllm.cli import main
from jaxllm.config import ConfigError, VisionConfig, validate
from jaxllm.data import ByteTokenizer, checked_tokenizer
from jaxllm.infer import Sampler
from jaxllm.infer.image_prompt import read_prompt_image
from jaxllm.nn import Transformer
from jaxllm.nn.vision import patchify
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.checkpoint import checkpointer
from jaxllm.train.loop import pretrain
from jaxllm.train.optimizer import make_optimizer
from jaxllm.train.run import load_run
from jaxllm.train.state import init_state

TOKENIZER = ByteTokenizer()
VISION = VisionConfig(image_size=8, patch_size=4)


# ---------------------------------------------------------------------------------------
# Config cross-checks


def test_an_image_source_needs_a_model_that_reads_images():
    with pytest.raises(ConfigError, match=r"^model.vision.image_size: data.source=images"):
        validate(Config(data=DataConfig(source="images")))
    validate(Config(model=ModelConfig(vision=VISION), data=DataConfig(source="images")))


def test_the_model_vocabulary_must_hold_the_tokenizer_in_every_phase():
    small = Config(model=ModelConfig(vocab_size=TOKENIZER.vocab_size - 1),
                   data=DataConfig(source="arithmetic"))
    message = rf"^model.vocab_size: {TOKENIZER.vocab_size - 1} is smaller than the tokenizer's"
    with pytest.raises(ConfigError, match=message):
        checked_tokenizer(small)
    with pytest.raises(ConfigError, match=message):  # before any state is built
        pretrain(small, log=lambda _: None)
    assert checked_tokenizer(dataclasses.replace(
        small, model=ModelConfig(vocab_size=TOKENIZER.vocab_size))).vocab_size == 274


def test_the_patch_token_must_be_the_tokenizers():
    wrong = Config(model=ModelConfig(vision=dataclasses.replace(VISION, patch_token_id=272)))
    with pytest.raises(ConfigError, match=r"^model.vision.patch_token_id: 272, .* <patch> at "
                                          "id 273"):
        checked_tokenizer(wrong)
    assert checked_tokenizer(Config(model=ModelConfig(vision=VISION))).special["<patch>"] == 273


# ---------------------------------------------------------------------------------------
# jaxllm generate --image


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    """The workdir of a checkpoint of a random tiny vision model whose patch embedding is
    scaled up, so that what it generates depends on the image."""
    workdir = tmp_path_factory.mktemp("vision_run")
    config = Config(model=tiny_model(vision=VISION, embed_dim=32, mlp_dim=64, num_heads=4,
                                     num_kv_heads=2),
                    mesh=MeshConfig(data=1), workdir=str(workdir))
    mesh = parallel.make_mesh(config, jax.devices()[:1])
    state, _ = init_state(Transformer(config.model), make_optimizer(config.train), 16, mesh,
                          jax.random.key(0))
    embed = jax.tree.map(lambda x: 300 * x, state.params["patch_embed"])
    state = state.replace(params={**state.params, "patch_embed": embed})
    checkpoints = checkpointer(config)
    checkpoints.save(1, state, config, force=True)
    checkpoints.close()
    workdir_lib.save_config(config, workdir)
    return workdir


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)


def sampled(workdir, image: np.ndarray | None, question: str, tokens: int) -> str:
    """The batched Sampler's greedy completion of the image question, built by hand: the
    image corpus's layout, the image resized as the data side resizes it."""
    _, model, state = load_run(workdir)
    sampler = Sampler(model, state.params, TOKENIZER)
    span = [271, *[273] * VISION.grid**2, 272]
    prompt = [TOKENIZER.bos_id, *TOKENIZER.encode("Q: "), *span,
              *TOKENIZER.encode(question + "\n")]
    pixels = np.zeros((8, 8, 3), np.float32) if image is None else np.asarray(
        Image.fromarray(image).resize((8, 8), Image.Resampling.BILINEAR), np.float32) / 255
    result = sampler.generate([prompt], max_new_tokens=tokens, temperature=0,
                              stop_ids=(TOKENIZER.special["</answer>"], TOKENIZER.eos_id),
                              patches=jnp.asarray(patchify(pixels, 4)[None]))
    return TOKENIZER.decode(result.tokens[0, :result.lengths[0]])


def test_generate_with_an_image_equals_the_batched_sampler(vision_run, tmp_path, capsys):
    Image.fromarray(picture(0)).save(tmp_path / "a.png")
    assert main(["generate", str(vision_run), "--image", str(tmp_path / "a.png"), "--prompt",
                 "What colour?", "--temperature", "0", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    echo = "Q: <image></image>What colour?\n"
    assert out.startswith(echo)
    want = sampled(vision_run, picture(0), "What colour?", 8)
    assert out[len(echo):-1] == want
    assert want != sampled(vision_run, None, "What colour?", 8)  # the image matters
    assert main(["generate", str(vision_run), "--image", str(tmp_path / "a.png"), "--prompt",
                 "What colour?", "--effort", "instant", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith(f"{echo}<think></think>")


def test_a_prompt_holding_the_image_span_tokens_is_refused(vision_run, tmp_path, capsys):
    """A stray <patch> would take the image's first patch and shift the others."""
    Image.fromarray(picture(0)).save(tmp_path / "a.png")
    assert main(["generate", str(vision_run), "--image", str(tmp_path / "a.png"), "--raw",
                 "--prompt", "<patch><image>What colour?"]) == 2
    assert "--prompt: holds </image> or <patch>; write the image as the marker <image> alone" \
        in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_a_bad_image_file_exits_with_2_naming_it(vision_run, tmp_path, capsys, case):
    path = tmp_path / "bad.png"
    if case == "corrupt":
        path.write_bytes(b"\x89PNG not really")
    assert main(["generate", str(vision_run), "--image", str(path), "--prompt", "Q"]) == 2
    reason = "does not exist" if case == "missing" else "cannot be read"
    assert f"--image: the image {path} {reason}" in capsys.readouterr().err


def test_an_image_for_a_text_only_model_names_the_vision_field(tmp_path):
    Image.fromarray(picture(0)).save(tmp_path / "a.png")
    with pytest.raises(ConfigError, match=r"^--image: .*model.vision.image_size=0"):
        read_prompt_image(tmp_path / "a.png", Config())
    large = Config(model=ModelConfig(vision=VISION), data=DataConfig(max_image_pixels=100))
    with pytest.raises(ConfigError, match=r"^data.max_image_pixels: --image: .* 12x12 pixels"):
        read_prompt_image(tmp_path / "a.png", large)


# ---------------------------------------------------------------------------------------
# jaxllm pretrain on images mixed with text


def losses(workdir) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.slow
def test_pretrain_the_tiny_multimodal_experiment_resume_and_eval_it(tmp_path, capsys):
    """On data 2 x fsdp 2 x context 2: ring attention, the tokens in zigzag order."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    workdir = tmp_path / "run"
    args = ["pretrain", "experiments/tiny_multimodal.py", "train.steps=4", "train.batch_size=8",
            "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
            "checkpoint.every=2", "model.embed_dim=32", "model.mlp_dim=64", "mesh.data=2",
            "mesh.fsdp=2", "mesh.context=2", f"workdir={workdir}", f"data.data_dir={data_dir}",
            "data.train_size=32", "data.validation_size=8", "data.test_size=8"]
    assert main(args) == 0
    whole = losses(workdir)
    assert sorted(whole) == [1, 2, 3, 4] and all(np.isfinite(list(whole.values())))
    assert {p.name for p in (workdir / "checkpoints").iterdir()} >= {"2", "4"}
    evaluations = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text()
                   .splitlines() if "eval_loss" in line]
    assert [e["step"] for e in evaluations] == [2, 4]
    assert main([*args, "checkpoint.resume_step=2"]) == 0
    resumed = losses(workdir)
    assert [resumed[s] for s in (3, 4)] == [whole[s] for s in (3, 4)]

    capsys.readouterr()
    assert main(["eval", str(workdir), "--problems", "8", "--max-new-tokens", "4"]) == 0
    table = capsys.readouterr().out.split("| family |")[1].splitlines()[2:]
    problems = sum(int(row.split("|")[2]) for row in table)
    assert problems == 8, table  # every test problem counted under its family
