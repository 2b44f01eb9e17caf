"""Image problems in RL and evaluation: their prompts, their patches, accuracy against chance.

An image problem (`jaxllm.data.images.ImageProblem`) prompts with its picture's span

    <bos> Q: <image> <patch> x g*g </image> question \\n <think>

and its picture's g*g patches (`jaxllm.nn.vision.patchify`, values in [0, 1]) go with the
prompt: one image per row, so a row's `patches` are [g*g, patch_size**2 * 3].
"""

import math

import numpy as np

from jaxllm.data import images
from jaxllm.infer.image_prompt import image_prompt as infer_image_prompt
from jaxllm.nn.vision import pixel_patches


def is_image(problem) -> bool:
    return isinstance(problem, images.ImageProblem)


def patch_size_of(sampler) -> int:
    """The patch size of a sampler's model (`model.vision.patch_size`)."""
    return sampler.model.config.vision.patch_size


def image_prompt(problem: images.ImageProblem, tokenizer, patch_size: int) -> list[int]:
    """The prompt's ids up to `<think>`'s place, its `<image>` marker expanded into the span of
    its picture's patches."""
    return infer_image_prompt(tokenizer, images.prompt(problem), problem.image,
                              patch_size=patch_size)[0]


def prompt_patches(problems, patch_size: int) -> np.ndarray | None:
    """float32 [N, g*g, patch_dim]: each problem's picture in [0, 1], cut into patches; None
    for text problems. Image and text problems do not mix."""
    kinds = {is_image(p) for p in problems}
    if len(kinds) > 1:
        raise ValueError("problems: image and text problems do not mix in one batch")
    if kinds != {True}:
        return None
    return np.stack([pixel_patches(p.image, patch_size) for p in problems])


def chance_table(result: dict[str, float], problems) -> list[dict]:
    """One row per family of `problems`: its count, `evaluate`'s accuracy, the standard
    error sqrt(p (1 - p) / n) and the chance rate of `images.CHANCE`."""
    counts = {}
    for problem in problems:
        counts[problem.family] = counts.get(problem.family, 0) + 1
    rows = []
    for family, n in sorted(counts.items(), key=lambda item: _order(item[0])):
        p = result[f"accuracy/{family}"]
        rows.append({"family": family, "problems": n, "accuracy": p,
                     "stderr": math.sqrt(p * (1 - p) / n), "chance": images.CHANCE[family]})
    return rows


def markdown(rows: list[dict]) -> str:
    """`chance_table` rows as a Markdown table."""
    lines = ["| family | problems | accuracy | ± s.e. | chance |", "|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['problems']} | {r['accuracy']:.3f} | {r['stderr']:.3f} "
              f"| {r['chance']:.3f} |" for r in rows]
    return "\n".join(lines)


def _order(family: str) -> int:
    return images.FAMILIES.index(family) if family in images.FAMILIES else len(images.FAMILIES)
