"""The chat messages of Constitutional AI's requests, filled from `ConstitutionConfig`'s
templates: the critique and revision of a response, and the comparison of two responses.

The pipeline (`jaxllm.post.constitution`) asks them of a model; the synthetic assistant
domain (`jaxllm.data.assistant`) writes demonstrations of them into pretraining text.
"""

from jaxllm.config import ConstitutionConfig

LETTERS = ("A", "B")  # the judge's answers: the first response, or the second


def critique_request(conversation: list[dict], response: str, principle: str,
                     cfg: ConstitutionConfig) -> list[dict]:
    """`conversation`, its `response`, then the request to critique it by `principle`."""
    return [*conversation, {"role": "assistant", "content": response},
            {"role": "user", "content": cfg.critique_template.format(principle=principle)}]


def revision_request(critiqued: list[dict], critique: str, principle: str,
                     cfg: ConstitutionConfig) -> list[dict]:
    """`critique_request`'s messages, the `critique`, then the request to revise."""
    return [*critiqued, {"role": "assistant", "content": critique},
            {"role": "user", "content": cfg.revision_template.format(principle=principle)}]


def judge_request(request: str, first: str, second: str, principle: str,
                  cfg: ConstitutionConfig) -> list[dict]:
    """The question whether `first` (A) or `second` (B) answers `request` better by
    `principle`; the judge answers with one of `LETTERS`."""
    text = cfg.judge_template.format(principle=principle, request=request, a=first, b=second)
    return [{"role": "user", "content": text}]
