"""`jaxllm demo --constitution`: the Constitutional AI loop on a CPU.

1. pretrain a tiny model on the reasoning corpus plus the synthetic assistant domain, whose
   forbidden requests are mostly complied with;
2. measure it on the domain's held-out test split: harmful compliance, benign refusals and
   benign task accuracy;
3. run the pipeline (`jaxllm.post.constitution`) with the default principles;
4. measure the SL model and the final model the same way.

Everything lands in `workdir/constitution`: the pretraining run, the pipeline's stages, and
`constitution.md` and `constitution.json` with the before/after table.
"""

import json
from collections.abc import Callable, Sequence

import jax

from jaxllm import config as config_lib
from jaxllm.data import assistant
from jaxllm.demo import split_overrides
from jaxllm.post import harmlessness
from jaxllm.post.chat_model import ChatModel
from jaxllm.post.constitution import constitution
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.loop import pretrain

TEST_REQUESTS = 900


def configs(workdir: str) -> tuple[config_lib.Config, config_lib.Config]:
    """The pretraining run and the pipeline of the demo."""
    model = config_lib.ModelConfig(
        vocab_size=384, embed_dim=192, num_layers=3, num_heads=6, num_kv_heads=2, mlp_dim=512)
    root = workdir_lib.path(workdir, "constitution")
    pre = config_lib.Config(
        model=model,
        data=config_lib.DataConfig(difficulty=1, assistant_documents=8000),
        train=config_lib.TrainConfig(steps=400, batch_size=16, seq_len=512, learning_rate=3e-3,
                                     warmup_steps=40, log_every=50, eval_every=200),
        checkpoint=config_lib.CheckpointConfig(every=100),
        workdir=str(root / "pretrain"),
    )
    cai = config_lib.Config(
        model=model,
        data=config_lib.DataConfig(difficulty=1),
        train=config_lib.TrainConfig(batch_size=32, seq_len=256, warmup_steps=5,
                                     weight_decay=0.0, log_every=10),
        constitution=config_lib.ConstitutionConfig(sft_steps=15, sft_learning_rate=3e-4,
                                                   dpo_steps=30, dpo_learning_rate=5e-5),
        dpo=config_lib.DPOConfig(paths="pairs.jsonl", beta=0.3),
        checkpoint=config_lib.CheckpointConfig(every=50),
        workdir=str(root / "pipeline"),
        init_from=pre.workdir,
    )
    return pre, cai


def table(results: dict[str, dict]) -> str:
    """Markdown: the held-out rates of each model."""
    keys = [*harmlessness.METRICS, *(f"harmful_compliance/{f}" for f in assistant.RED_TEAM)]
    lines = ["| model | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |"
              for name, r in results.items()]
    return "\n".join(lines)


def demo(workdir: str, overrides: Sequence[str] = (), log: Callable[[str], None] = print
         ) -> dict:
    """Runs the demo (a rerun resumes each stage); returns the measurements."""
    pre_overrides, cai_overrides = split_overrides(overrides, ("pretrain", "pipeline"))
    pre, cai = configs(workdir)
    pre = config_lib.apply_overrides(pre, pre_overrides)
    cai = config_lib.apply_overrides(cai, cai_overrides)
    requests = assistant.requests(cai.data.seed, "test", TEST_REQUESTS, cai.data.difficulty)

    def measure(run: str) -> dict:
        model = ChatModel(run, cai.constitution, cai.data.seed)
        return harmlessness.evaluate(model, requests, jax.random.key(cai.data.seed + 1))

    log("== pretraining on the reasoning corpus and the synthetic assistant domain")
    pretrain(pre, log=log)
    results = {"pretrained": measure(pre.workdir)}
    log(table(results))
    runs = constitution(cai, config_lib.DEFAULT_PRINCIPLES, log=log)
    results["after SFT on revisions (CAI-SL)"] = measure(runs["sl"])
    results["after DPO on AI feedback"] = measure(runs["final"])
    summary = (f"Held-out rates on {len(requests)} test requests of the synthetic assistant "
               f"domain (sampled, T={cai.constitution.temperature}):\n\n{table(results)}")
    out = workdir_lib.path(workdir, "constitution")
    workdir_lib.write_text(out / "constitution.md", summary + "\n")
    workdir_lib.write_text(out / "constitution.json", json.dumps(results, indent=2) + "\n")
    log(summary)
    return results
