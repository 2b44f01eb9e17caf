"""The Constitutional AI pipeline (Bai et al. 2022, arXiv 2212.08073) on SFT and DPO.

From the model of `config.init_from`, in `config.workdir`:

1. samples.jsonl    a response to each red-team and helpful prompt;
2. revisions.jsonl  for each red-team response, a principle drawn at random, the model's
                    critique of the response by it, and its revision; helpful prompts keep
                    their response (the SFT set of the paper's supervised stage);
3. sl/              SFT on revisions.jsonl (CAI-SL);
4. feedback.jsonl   two responses of the SL model to each prompt, judged against a drawn
                    principle, in both orders, by the feedback model: `init_from`'s, as in
                    the paper, where a pretrained model gives the feedback; pairs.jsonl keeps
                    the pairs it prefers with probability >= `min_judge_probability`;
5. dpo/             DPO from the SL model on pairs.jsonl (RL from AI feedback, with DPO in
                    place of PPO).

Every stage resumes: the generation stages save each batch of records as it is done and
skip the saved ones on a rerun, and the training stages resume from their checkpoints. A
stage's JSONL file appears, whole, once the stage is complete. Sampling is seeded by
`data.seed` and the batch, so a resumed stage writes what an uninterrupted one would.
"""

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxllm import config as config_lib
from jaxllm.config import ConfigError, ConstitutionConfig, DPOConfig
from jaxllm.data import assistant, chat
from jaxllm.data import constitution_prompts as prompts_lib
from jaxllm.post.chat_model import ChatModel
from jaxllm.post.dpo import dpo
from jaxllm.train.sft import sft

Log = Callable[[str], None]


def constitution(config: config_lib.Config, principles: Sequence[str], log: Log = print
                 ) -> dict[str, str]:
    """Runs (or resumes) the five stages; returns the workdirs of the SL and final models."""
    config = config_lib.validate(config)
    cfg = config.constitution
    if cfg is None:
        raise ConfigError("constitution: the experiment sets no ConstitutionConfig")
    if not config.init_from or not config.workdir:
        raise ConfigError("init_from, workdir: the pipeline starts from init_from's model and "
                          "writes its stages into workdir; set both")
    if jax.process_count() > 1:
        raise ConfigError("constitution: the pipeline runs in one process")
    root = epath.Path(config.workdir)
    records = read_prompts(config)
    log(f"== 1/5 responses to {len(records)} prompts, from {config.init_from}")
    model = ChatModel(config.init_from, cfg, config.data.seed)
    samples = _stage(root / "samples.jsonl", records, functools.partial(_sample, model=model),
                     cfg=cfg, log=log)
    log(f"== 2/5 critiques and revisions by {len(principles)} principles")
    reviser = functools.partial(_revise, model=model, principles=principles,
                                seed=config.data.seed)
    _stage(root / "revisions.jsonl", samples, reviser, cfg=cfg, log=log)
    log("== 3/5 SFT on the revisions")
    sl = _sl_config(config, root)
    sft(sl, log=log)
    log("== 4/5 AI feedback: pairs of the SL model's responses, judged by the initial model")
    policy = ChatModel(sl.workdir, cfg, config.data.seed)
    feedback = _stage(root / "feedback.jsonl", records,
                      functools.partial(_feedback, policy=policy, judge=model,
                                        principles=principles, seed=config.data.seed),
                      cfg=cfg, log=log)
    pairs = _write_pairs(root / "pairs.jsonl", feedback, cfg.min_judge_probability)
    log(f"the judge kept {pairs} of {len(feedback)} pairs")
    log("== 5/5 DPO on the AI-labelled pairs")
    final = _dpo_config(config, root, sl.workdir)
    dpo(final, log=log)
    return {"sl": sl.workdir, "final": final.workdir}


def read_prompts(config: config_lib.Config) -> list[dict]:
    """The prompt records: chat messages ending with a user turn, and a kind, red_team or
    helpful. A bad line of a prompts file is refused, naming the file and line."""
    cfg = config.constitution
    if cfg.prompts == "synthetic":
        requests = assistant.requests(config.data.seed, "train", cfg.num_prompts,
                                      config.data.difficulty)
        return [r.to_record() for r in requests]
    path = Path(cfg.prompts)
    if not path.is_file():
        raise ConfigError(f"constitution.prompts: {cfg.prompts!r} is not a file")
    records = []
    for number, line in enumerate(path.read_text().split("\n"), 1):
        if line.strip():
            records.append(_prompt_record(line, f"constitution.prompts: {path}:{number}"))
    if not records:
        raise ConfigError(f"constitution.prompts: {path} holds no prompts")
    return records


def _prompt_record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where} is not JSON ({error})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{where} is not a JSON object")
    if isinstance(record.get("prompt"), str):
        record["messages"] = [{"role": "user", "content": record.pop("prompt")}]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
            or messages[-1].get("role") != "user":
        raise ConfigError(f"{where} needs a string 'prompt' or 'messages' ending with a user "
                          "turn")
    try:
        chat.conversation({"messages": [*messages, {"role": "assistant", "content": ""}]})
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None
    kind = record.setdefault("kind", "red_team")
    if kind not in ("red_team", "helpful"):
        raise ConfigError(f"{where} has kind {kind!r}, not red_team or helpful")
    return record


def _sample(records: list[dict], start: int, *, model: ChatModel) -> list[dict]:
    """Stage 1: `records` with a sampled `response` each."""
    responses = model.respond([r["messages"] for r in records], model.rng(start, 0))
    return [dict(r, response=text) for r, text in zip(records, responses)]


def _principle(principles: Sequence[str], seed: int, index: int) -> str:
    """The principle drawn for record `index`."""
    return principles[int(np.random.default_rng((seed, index)).integers(len(principles)))]


def _revise(samples: list[dict], start: int, *, model: ChatModel, principles: Sequence[str],
            seed: int) -> list[dict]:
    """Stage 2: red-team responses critiqued and revised; the SFT conversations."""
    red = [i for i, s in enumerate(samples) if s["kind"] == "red_team"]
    drawn = {i: _principle(principles, seed, start + i) for i in red}
    cfg = model.cfg
    critiqued = {i: prompts_lib.critique_request(samples[i]["messages"], samples[i]["response"],
                                                 drawn[i], cfg) for i in red}
    critiques = dict(zip(red, model.respond([critiqued[i] for i in red], model.rng(start, 1))))
    revisions = dict(zip(red, model.respond(
        [prompts_lib.revision_request(critiqued[i], critiques[i], drawn[i], cfg) for i in red],
        model.rng(start, 2))))
    out = []
    for i, sample in enumerate(samples):
        answer = revisions.get(i, sample["response"])
        out.append(dict(sample, messages=[*sample["messages"],
                                          {"role": "assistant", "content": answer}],
                        principle=drawn.get(i), critique=critiques.get(i),
                        revision=revisions.get(i)))
    return out


def _feedback(records: list[dict], start: int, *, policy: ChatModel, judge: ChatModel,
              principles: Sequence[str], seed: int) -> list[dict]:
    """Stage 4: two responses of `policy` to each prompt, and `judge`'s probability that the
    first is the better by a drawn principle, averaged over both orders of the pair."""
    conversations = [r["messages"] for r in records]
    first = policy.respond(conversations, policy.rng(start, 3))
    second = policy.respond(conversations, policy.rng(start, 4))
    drawn = [_principle(principles, seed + 1, start + i) for i in range(len(records))]
    request = [r["messages"][-1]["content"] for r in records]
    cfg = judge.cfg
    ab = judge.prefer_first([prompts_lib.judge_request(q, a, b, p, cfg)
                             for q, a, b, p in zip(request, first, second, drawn)])
    ba = judge.prefer_first([prompts_lib.judge_request(q, b, a, p, cfg)
                             for q, a, b, p in zip(request, first, second, drawn)])
    return [dict(r, first=a, second=b, principle=p, first_probability=float((x + 1 - y) / 2))
            for r, a, b, p, x, y in zip(records, first, second, drawn, ab, ba)]


def _write_pairs(path: epath.Path, feedback: list[dict], min_probability: float) -> int:
    """Writes the DPO pairs the judge is confident of; returns how many. A pair of equal or
    empty responses is no preference and is left out."""
    lines = []
    for f in feedback:
        if f["first"] == f["second"] or not (f["first"].strip() and f["second"].strip()):
            continue
        p = f["first_probability"]
        if max(p, 1 - p) < min_probability:
            continue
        chosen, rejected = (f["first"], f["second"]) if p >= 0.5 else (f["second"], f["first"])
        lines.append(json.dumps({"prompt": f["messages"], "chosen": chosen,
                                 "rejected": rejected, "principle": f["principle"],
                                 "probability": max(p, 1 - p)}))
    if not lines:
        raise ConfigError(f"constitution.min_judge_probability: the judge preferred no pair of "
                          f"{len(feedback)} by {min_probability} or more; lower it")
    _write_atomically(path, lines)
    return len(lines)


def _stage(path: epath.Path, items: list[dict], work: Callable[[list[dict], int], list[dict]],
           *, cfg: ConstitutionConfig, log: Log) -> list[dict]:
    """The records of `work` over `items`, batch by batch, in `path` (JSONL).

    Each batch is saved as a part of its own, written whole; a rerun reads the saved parts
    instead of redoing them. Once every part is there, `path` is written and the parts go.
    """
    if path.exists():
        return _read_jsonl(path)
    parts = path.parent / f"{path.name}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    records = []
    for start in range(0, len(items), cfg.batch_size):
        part = parts / f"{start:09d}.jsonl"
        if not part.exists():
            done = work(items[start:start + cfg.batch_size], start)
            _write_atomically(part, [json.dumps(r) for r in done])
            log(f"{path.name}: {min(start + cfg.batch_size, len(items))}/{len(items)}")
        records += _read_jsonl(part)
    _write_atomically(path, [json.dumps(r) for r in records])
    parts.rmtree()
    return records


def _read_jsonl(path: epath.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def _write_atomically(path: epath.Path, lines: list[str]) -> None:
    """Writes `lines` to a temporary file, then moves it over `path`: `path` is whole or
    absent."""
    temporary = path.parent / f"{path.name}.tmp"
    temporary.write_text("".join(line + "\n" for line in lines))
    temporary.replace(path)


def _sl_config(config: config_lib.Config, root: epath.Path) -> config_lib.Config:
    """The SFT stage: `init_from`'s model on revisions.jsonl."""
    cfg = config.constitution
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, source="chat", paths=str(root / "revisions.jsonl"),
                                 name=None, eval_split=None, assistant_documents=0),
        train=dataclasses.replace(config.train, steps=cfg.sft_steps,
                                  learning_rate=cfg.sft_learning_rate, eval_every=0),
        workdir=str(root / "sl"), grpo=None, dpo=None, distill=None)


def _dpo_config(config: config_lib.Config, root: epath.Path, sl: str) -> config_lib.Config:
    """The DPO stage: the SL model on pairs.jsonl."""
    cfg = config.constitution
    return dataclasses.replace(
        config,
        dpo=dataclasses.replace(config.dpo or DPOConfig(), paths=str(root / "pairs.jsonl"),
                                eval_paths=None),
        train=dataclasses.replace(config.train, steps=cfg.dpo_steps,
                                  learning_rate=cfg.dpo_learning_rate, eval_every=0),
        workdir=str(root / "dpo"), init_from=sl, grpo=None, distill=None)
