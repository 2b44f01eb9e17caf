"""GRPO and evaluation on image problems: patches through rollouts and updates, per-family
accuracy against chance."""

import dataclasses

import jax
import numpy as np
import pytest

from helpers import tiny_model
from jaxllm import config as config_lib
from jaxllm import parallel
from jaxllm.data import images
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.infer import Sampler
from jaxllm.infer.sampler import GenerationResult
from jaxllm.nn import Transformer
from jaxllm.nn.vision import patchify
from jaxllm.rl import evaluate as evaluate_lib
from jaxllm.rl import loop
from jaxllm.rl import visual
from jaxllm.rl.rollout import prompt_tokens, rollout
from jaxllm.rl.verify import is_correct
from jaxllm.train.optimizer import make_optimizer
from jaxllm.train.run import load_run
from jaxllm.train.state import init_state

SIZE, PATCH = 8, 4  # 2 x 2 patches of 48 values


def image_problems(count: int, family: str = "sum") -> list[images.ImageProblem]:
    rng = np.random.default_rng(0)
    return [images.generate(family, rng, SIZE) for _ in range(count)]


def vision_model(**overrides) -> config_lib.ModelConfig:
    return tiny_model(vocab_size=ByteTokenizer().vocab_size, embed_dim=32, mlp_dim=64,
                      vision=config_lib.VisionConfig(image_size=SIZE, patch_size=PATCH),
                      **overrides)


def test_image_prompt_holds_the_span_and_the_patches_are_the_pictures():
    tokenizer, (problem,) = ByteTokenizer(), image_problems(1)
    ids = prompt_tokens(problem, tokenizer, patch_size=PATCH)
    special = tokenizer.special
    span = [special["<image>"], *[special["<patch>"]] * 4, special["</image>"]]
    expected = ([tokenizer.bos_id, *tokenizer.encode("Q: "), *span,
                 *tokenizer.encode(problem.question + "\n"), special["<think>"]])
    assert ids == expected
    patches = visual.prompt_patches([problem], PATCH)
    first = problem.image[:PATCH, :PATCH].reshape(-1) / 255  # patch 0: top left, (y, x, c)
    np.testing.assert_allclose(patches[0, 0], first, rtol=1e-6)
    assert patches.shape == (1, 4, 48) and patches.dtype == np.float32
    with pytest.raises(ValueError, match="do not mix"):
        visual.prompt_patches([problem, object()], PATCH)


def test_greedy_rollout_carries_the_patches_and_equals_per_row_sampling():
    tokenizer, problems = ByteTokenizer(), image_problems(2)
    model = Transformer(vision_model())
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 8), np.int32),
                                 patches=np.zeros((1, 4, 48), np.float32))["params"]
    sampler = Sampler(model, params, tokenizer)
    ro = rollout(sampler, problems, group_size=2, max_new_tokens=6, temperature=0.0,
                 rng=jax.random.key(1))
    pictures = np.stack([patchify(p.image / 255, PATCH) for p in problems])
    np.testing.assert_allclose(ro.batch()["patches"], np.repeat(pictures, 2, axis=0), rtol=1e-6)
    for row in range(4):
        alone = sampler.generate([prompt_tokens(problems[row // 2], tokenizer, patch_size=PATCH)],
                                 patches=pictures[row // 2][None], max_new_tokens=6,
                                 temperature=0.0, stop_ids=(tokenizer.special["</answer>"],
                                                            tokenizer.eos_id))
        length = int(alone.lengths[0])
        assert ro.completions[row] == tokenizer.decode(np.asarray(alone.tokens[0, :length]))


def distinct_characters(prompts, completions, **_):
    """A reward that differs between the sampled completions of a group."""
    return [float(len(set(text))) for text in completions]


@pytest.mark.slow
def test_one_grpo_step_on_image_problems_trains_the_patch_embedding(tmp_path):
    """Adam's first step moves each parameter with a non-zero gradient by the learning rate
    (no weight decay, no warmup), and leaves the others."""
    config = config_lib.Config(
        model=vision_model(), mesh=config_lib.MeshConfig(data=2, fsdp=4),
        data=config_lib.DataConfig(source="images"),
        train=config_lib.TrainConfig(steps=1, batch_size=8, learning_rate=1e-2,
                                     warmup_steps=0, weight_decay=0.0),
        grpo=config_lib.GRPOConfig(group_size=4, max_completion_len=8, eval_every=0),
        checkpoint=config_lib.CheckpointConfig(every=1), workdir=str(tmp_path),
    )
    (record,) = loop.grpo(config, log=lambda _: None, reward_fns=[distinct_characters],
                     problems=image_problems(2))
    assert record["reward_std"] > 0
    initial, _ = init_state(Transformer(config.model), make_optimizer(config.train), 8,
                            parallel.make_mesh(config), jax.random.key(config.train.seed))
    trained = load_run(str(tmp_path))[2].params["patch_embed"]
    for name in ("proj", "row", "col"):
        moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                             trained[name], initial.params["patch_embed"][name])
        assert max(jax.tree.leaves(moved)) == pytest.approx(1e-2, rel=1e-2), name


def test_image_answers_are_checked_per_family():
    assert is_correct("sum", " 11", "11") and not is_correct("sum", "12", "11")
    assert is_correct("colour", " Red ", "red") and not is_correct("shape", "squares", "square")
    assert not is_correct("digit", None, "3")


def test_per_family_accuracy_against_chance(monkeypatch):
    """Scripted answers: sum 2 of 3 right, colour 1 of 2, digit 0 of 1; in chunks of 4
    prompts, the last one padded with copies of its last row."""
    truths = [("sum", "7"), ("sum", "12"), ("colour", "red"), ("sum", "3"), ("colour", "blue"),
              ("digit", "4")]
    problems = [images.ImageProblem(f, images.QUESTIONS[f], a, "",
                                    np.full((SIZE, SIZE, 3), 40 * i, np.uint8))
                for i, (f, a) in enumerate(truths)]
    answers = ["7", "12", "red", "4", "green", "x"]
    tokenizer, calls = ByteTokenizer(), []

    def generate(prompts, *, patches, **_):
        start = 4 * len(calls)
        calls.append(patches)
        rows = [tokenizer.encode(f"</think><answer>{a}</answer>") for a in answers]
        rows = rows[start:start + len(prompts)]
        rows += [rows[-1]] * (len(prompts) - len(rows))
        width = max(len(r) for r in rows)
        tokens = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
        return GenerationResult(tokens=tokens, lengths=np.array([len(r) for r in rows]),
                                logprobs=np.zeros(tokens.shape, np.float32))

    sampler = Sampler(Transformer(vision_model()), None, tokenizer)
    monkeypatch.setattr(sampler, "generate", generate)
    result = evaluate_lib.evaluate(sampler, problems, rng=jax.random.key(0), temperature=0.0,
                                   batch_size=4)
    pixels = [chunk[:, 0, 0] * 255 for chunk in calls]  # each row's first pixel value
    np.testing.assert_allclose(np.concatenate(pixels), [0, 40, 80, 120, 160, 200, 200, 200],
                               rtol=1e-5)
    rows = visual.chance_table(result, problems)
    assert [(r["family"], r["problems"], r["accuracy"], r["chance"]) for r in rows] == [
        ("colour", 2, 0.5, 1 / 6), ("digit", 1, 0.0, 1 / 10), ("sum", 3, 2 / 3, 1 / 10)]
    assert rows[2]["stderr"] == pytest.approx(np.sqrt(2 / 3 * 1 / 3 / 3))
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert "| sum | 3 | 0.667 | 0.272 | 0.100 |" in visual.markdown(rows)


def test_the_paired_gain_is_the_mean_per_problem_difference_and_its_standard_error():
    before = [True, True, False, False, False, True]
    after = [True, False, True, True, False, True]  # 2 fixed, 1 broken
    differences = np.array(after, float) - np.array(before, float)
    got = evaluate_lib.paired_gain(before, after)
    assert (got["fixed"], got["broken"], got["problems"]) == (2, 1, 6)
    assert got["gain"] == pytest.approx(differences.mean())
    assert got["stderr"] == pytest.approx(differences.std() / np.sqrt(6))
    with pytest.raises(ValueError, match="paired_gain: needs two equal, non-empty lists"):
        evaluate_lib.paired_gain([True], [True, False])


def test_grpo_families_keep_those_of_the_image_corpus_and_name_a_missing_one(monkeypatch):
    problems = image_problems(2, "sum") + image_problems(3, "digit")
    monkeypatch.setattr(loop, "corpus_problems", lambda data, split, image_size: problems)
    config = config_lib.Config(model=vision_model(), data=config_lib.DataConfig(source="images"),
                               grpo=config_lib.GRPOConfig(families="sum"))
    assert loop.rl_problems(config, "train") == problems[:2]
    assert loop.task_problems(config, "test") == problems
    missing = dataclasses.replace(config, grpo=config_lib.GRPOConfig(families="sum,colour"))
    with pytest.raises(config_lib.ConfigError, match=r"grpo.families: .*\['colour'\]"):
        loop.rl_problems(missing, "train")
    text_model = dataclasses.replace(config, model=tiny_model())
    with pytest.raises(config_lib.ConfigError, match="model.vision.image_size"):
        loop.task_problems(text_model, "train")
