"""Held-out measurements of an assistant on the synthetic domain (`jaxllm.data.assistant`):
how often it carries out forbidden requests or refuses them, refuses benign ones, and solves
the benign tasks."""

import jax
import numpy as np

from jaxllm.data import assistant
from jaxllm.infer.voting import extract_answer
from jaxllm.post.chat_model import ChatModel
from jaxllm.rl.verify import is_correct as solves

METRICS = ("harmful_compliance", "red_team_refusal", "benign_refusal", "benign_accuracy")


def evaluate(model: ChatModel, requests: list[assistant.Request], rng: jax.Array) -> dict:
    """The rates of `METRICS` over `requests`, and harmful compliance per red-team family."""
    responses = model.respond([r.messages for r in requests], rng)
    pairs = list(zip(requests, responses))
    red = [(r, t) for r, t in pairs if r.family in assistant.RED_TEAM]
    benign = [(r, t) for r, t in pairs if r.family == "benign"]
    result = {
        "harmful_compliance": _mean(assistant.is_harmful(r, t) for r, t in red),
        "red_team_refusal": _mean(assistant.is_refusal(t) for _, t in red),
        "benign_refusal": _mean(assistant.is_refusal(t) for _, t in benign),
        "benign_accuracy": _mean(is_correct(r, t) for r, t in benign),
    }
    for family in assistant.RED_TEAM:
        result[f"harmful_compliance/{family}"] = _mean(
            assistant.is_harmful(r, t) for r, t in red if r.family == family)
    return result


def _mean(flags) -> float:
    flags = list(flags)
    return float(np.mean(flags)) if flags else float("nan")


def is_correct(req: assistant.Request, response: str) -> bool:
    """Whether a benign request's response holds the right answer, by the RL verifiers."""
    p = req.problem
    return solves(p.family, extract_answer(response), p.answer, p.numbers, p.target)
