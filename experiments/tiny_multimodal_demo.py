"""Visual RLVR on a CPU (docs/multimodal.md, "Demo"): a tiny early-fusion model pretrained on
the image corpus (and some reasoning text), evaluated per family against chance, improved on
visual arithmetic (`sum`) by GRPO with the verifiers' rewards, and evaluated again.

    python experiments/tiny_multimodal_demo.py runs/tiny_multimodal_demo

writes demo.md and demo.json (the tables) and examples.png (test pictures with the answers
before and after GRPO) into the run directory; a rerun resumes each stage.
"""

import json
import sys
import textwrap

import jax

from jaxllm import Config
from jaxllm import config as config_lib
from jaxllm.data import images
from jaxllm.data.image_readers import image_source
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.infer import Sampler
from jaxllm.rl import visual
from jaxllm.rl.evaluate import evaluate, paired_gain, sample_answers
from jaxllm.rl.loop import grpo, task_problems
from jaxllm.rl.verify import is_correct
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.loop import pretrain
from jaxllm.train.run import load_run

MAX_NEW_TOKENS = 16  # "<think>9+9=18</think><answer>18</answer>" is 12 tokens after <think>
EXAMPLES = 3  # test pictures per family in the figure


def configs(workdir: str) -> tuple[Config, Config]:
    """The pretraining run and the GRPO run on `sum`."""
    model = config_lib.ModelConfig(
        vocab_size=384, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
        vision=config_lib.VisionConfig(image_size=16, patch_size=4),
    )
    data = config_lib.DataConfig(source="images", difficulty=1, train_size=20_000,
                                 validation_size=200, test_size=2_000, text_share=0.1)
    pre = Config(
        model=model, data=data,
        train=config_lib.TrainConfig(steps=1500, batch_size=32, seq_len=96, learning_rate=3e-3,
                                     warmup_steps=30, log_every=20, eval_every=0),
        checkpoint=config_lib.CheckpointConfig(every=300),
        workdir=str(workdir_lib.path(workdir, "pretrain")),
    )
    rl = Config(
        model=model, data=data,
        train=config_lib.TrainConfig(steps=250, batch_size=256, seq_len=96, learning_rate=1e-4,
                                     warmup_steps=0, weight_decay=0.0, b2=0.999, log_every=10),
        grpo=config_lib.GRPOConfig(group_size=8, max_completion_len=MAX_NEW_TOKENS,
                                   families="sum", eval_every=0),
        checkpoint=config_lib.CheckpointConfig(every=50),
        workdir=str(workdir_lib.path(workdir, "grpo")),
        init_from=pre.workdir,
    )
    return pre, rl


def config() -> Config:
    """The GRPO run, for `jaxllm grpo experiments/tiny_multimodal_demo.py`."""
    return configs("runs/tiny_multimodal_demo")[1]


class AnswersOnly:
    """A source whose batches train only past each prompt's `<think>` (`mask_prompt`): the
    loss is on the thoughts and answers, not on the fixed question texts."""

    def __init__(self, source):
        self.source = source

    def batches(self, batch_size: int, seq_len: int, start: int = 0):
        return self.source.batches(batch_size, seq_len, start, mask_prompt=True)


def sampler_of(workdir: str) -> Sampler:
    """A sampler of the latest checkpoint in `workdir`."""
    config, model, state = load_run(workdir)
    return Sampler(model, state.params, load_tokenizer(config.data.tokenizer),
                   moe_bias=state.moe_bias)


def measure(workdir: str, problems) -> tuple[list[dict], dict]:
    """Greedy held-out accuracy per family against chance, and `evaluate`'s result."""
    result = evaluate(sampler_of(workdir), problems, rng=jax.random.key(0), temperature=0.0,
                      max_new_tokens=MAX_NEW_TOKENS)
    return visual.chance_table(result, problems), result


def examples(problems) -> list[images.ImageProblem]:
    """The first `EXAMPLES` test problems of each family."""
    return [p for family in images.FAMILIES
            for p in [q for q in problems if q.family == family][:EXAMPLES]]


def greedy_answers(workdir: str, problems) -> list[str | None]:
    answers, _, _ = sample_answers(sampler_of(workdir), problems, rng=jax.random.key(0),
                                   temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    return answers


def gain(problems, before: str, after: str) -> dict:
    """`paired_gain` of the greedy answers of the checkpoints in `before` and `after`."""
    def correct(workdir):
        answers = greedy_answers(workdir, problems)
        return [is_correct(p.family, a, p.answer) for p, a in zip(problems, answers)]

    return paired_gain(correct(before), correct(after))


def examples_figure(problems, before: list, after: list, path) -> None:
    """A grid of pictures (a row per family) with the question, the answers before and after
    GRPO (✓ or ✗) and the truth."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2.2 * EXAMPLES, 2.6 * len(images.FAMILIES)), layout="constrained")
    axes = figure.subplots(len(images.FAMILIES), EXAMPLES, squeeze=False).ravel()
    for ax, problem, first, second in zip(axes, problems, before, after):
        def mark(answer):
            right = is_correct(problem.family, answer, problem.answer)
            return f"{answer}{' ✓' if right else ' ✗'}"

        ax.imshow(problem.image, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title("\n".join(textwrap.wrap(problem.question, 26)), fontsize=7)
        ax.set_xlabel(f"before: {mark(first)}\nafter: {mark(second)}\ntruth: {problem.answer}",
                      fontsize=8)
    workdir_lib.save_figure(figure, path)


def main(workdir: str) -> None:
    pre, rl = configs(workdir)
    vision = pre.model.vision
    tokenizer = load_tokenizer(pre.data.tokenizer)
    source = image_source(pre.data, tokenizer=tokenizer, image_size=vision.image_size,
                          patch_size=vision.patch_size)
    pretrain(pre, source=AnswersOnly(source))
    problems = task_problems(rl, "test")
    table_before, result_before = measure(pre.workdir, problems)
    print(visual.markdown(table_before))
    grpo(rl)
    table_after, result_after = measure(rl.workdir, problems)
    trained = [p for p in problems if p.family in rl.grpo.family_names]
    paired = gain(trained, pre.workdir, rl.workdir)
    shown = examples(problems)
    before, after = greedy_answers(pre.workdir, shown), greedy_answers(rl.workdir, shown)
    out = workdir_lib.path(workdir)
    examples_figure(shown, before, after, out / "examples.png")
    summary = "\n\n".join([
        f"Greedy accuracy on the {len(problems)} test problems, pretrained:",
        visual.markdown(table_before), "After GRPO on sum:", visual.markdown(table_after),
        f"On the same {paired['problems']} sum problems, GRPO fixed {paired['fixed']} answers "
        f"and broke {paired['broken']}: a paired gain of {paired['gain']:+.3f} ± "
        f"{paired['stderr']:.3f} (s.e.)."])
    workdir_lib.write_text(out / "demo.md", summary + "\n")
    workdir_lib.write_text(out / "demo.json", json.dumps(
        {"pretrained": result_before, "after_grpo": result_after, "paired_gain": paired,
         "chance": images.CHANCE}, indent=2) + "\n")
    print(summary)
    print(f"wrote {out / 'demo.md'} and {out / 'examples.png'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_multimodal_demo")
