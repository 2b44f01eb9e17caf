"""GRPO from a Hugging Face checkpoint, imported first with `jaxllm convert hf-import`:

    jaxllm convert hf-import HF_DIR --out runs/hf
    jaxllm grpo experiments/hf_grpo.py workdir=runs/hf_grpo

The model, tokenizer and chat template are the imported ones (`runs/hf/config.json`);
prompts go through the chat template, and a completion stops at the tokenizer's eos.
"""

import dataclasses

from jaxllm import Config, TrainConfig
from jaxllm.config import GRPOConfig
from jaxllm.train.run import read_config

IMPORTED = "runs/hf"


def config() -> Config:
    imported = read_config(IMPORTED)
    return dataclasses.replace(
        imported,
        train=TrainConfig(steps=50, batch_size=16, learning_rate=1e-6, warmup_steps=0,
                          weight_decay=0.0, log_every=1),
        grpo=GRPOConfig(group_size=8, max_completion_len=256, beta=0.04, eval_every=10),
        init_from=IMPORTED,
        workdir="runs/hf_grpo",
    )
