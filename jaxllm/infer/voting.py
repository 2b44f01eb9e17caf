"""Self-consistency (Wang et al. 2022): sample N completions, vote on their answers."""

import collections
import dataclasses
from collections.abc import Callable, Sequence

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def extract_answer(text: str, normalize: Callable[[str], str] | None = None) -> str | None:
    """The stripped text of the first `<answer>...</answer>` in `text`, or None if there is
    no closed answer. `normalize` (e.g. a verifier's canonical form) is applied last."""
    start = text.find(ANSWER_OPEN)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE, start)
    if end < 0:
        return None
    answer = text[start:end].strip()
    return normalize(answer) if normalize else answer


@dataclasses.dataclass(frozen=True)
class Vote:
    """The majority answer (None when no sample answered), its votes, and the samples."""

    answer: str | None
    votes: int
    samples: int

    @property
    def agreement(self) -> float:
        """The fraction of all samples, answered or not, that gave the majority answer."""
        return self.votes / self.samples


def majority_vote(answers: Sequence[str | None]) -> Vote:
    """The most common non-None answer; ties go to the answer seen first."""
    if not answers:
        raise ValueError("answers: need at least one sample to vote on")
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return Vote(None, 0, len(answers))
    answer, votes = counts.most_common(1)[0]  # insertion order breaks ties
    return Vote(answer, votes, len(answers))


def self_consistency(sampler, texts: Sequence[str], num_samples: int, *,
                     normalize: Callable[[str], str] | None = None, **kwargs) -> list[Vote]:
    """Samples `num_samples` completions of each text with `sampler.complete(**kwargs)` (one
    batch of len(texts) * num_samples rows) and votes on each text's answers."""
    if num_samples < 1:
        raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
    repeated = [text for text in texts for _ in range(num_samples)]
    completions = sampler.complete(repeated, **kwargs)
    answers = [extract_answer(c, normalize) for c in completions]
    return [
        majority_vote(answers[i * num_samples:(i + 1) * num_samples]) for i in range(len(texts))
    ]
