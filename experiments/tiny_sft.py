"""SFT of the demo's pretrained model on chat or prompt/response JSONL records:

    jaxllm demo                  # or any pretraining run of the same model
    jaxllm sft experiments/tiny_sft.py data.paths=chat.jsonl workdir=runs/tiny_sft

The byte tokenizer has no chat template, so records are rendered in the plain format
(docs/post_training.md); the loss is on the assistant's tokens only.
"""

import dataclasses

from jaxllm import Config, DataConfig, TrainConfig
from jaxllm.demo import configs


def config() -> Config:
    pretrain, _ = configs("runs/demo")
    return dataclasses.replace(
        pretrain,
        data=DataConfig(source="chat", paths="chat.jsonl", eval_split=None),
        train=TrainConfig(steps=100, batch_size=16, seq_len=128, learning_rate=1e-3,
                          warmup_steps=10, log_every=10, eval_every=0),
        workdir="runs/tiny_sft",
        init_from=pretrain.workdir,
    )
