"""The RL phase of `jaxllm demo` on its own: GRPO from the demo's pretrained model.

    jaxllm demo                  # or any pretraining run of the same model
    jaxllm grpo experiments/tiny_grpo.py init_from=runs/demo/pretrain workdir=runs/tiny_grpo
"""

import dataclasses

from jaxllm import Config
from jaxllm.demo import configs


def config() -> Config:
    _, rl = configs("runs/demo")
    return dataclasses.replace(rl, workdir="runs/tiny_grpo")
