"""DPO from the demo's pretrained model on preference pairs in JSONL
(docs/post_training.md shows how to write arithmetic pairs).

    jaxllm demo                  # or any pretraining run of the same model
    jaxllm dpo experiments/tiny_dpo.py init_from=runs/demo/pretrain \
        dpo.paths=runs/pairs/train.jsonl dpo.eval_paths=runs/pairs/eval.jsonl
"""

from jaxllm import Config, TrainConfig
from jaxllm.config import CheckpointConfig, DPOConfig
from jaxllm.demo import configs


def config() -> Config:
    pretrain, _ = configs("runs/demo")
    return Config(
        model=pretrain.model,
        data=pretrain.data,  # its tokenizer renders the pairs
        train=TrainConfig(steps=100, batch_size=32, seq_len=64, learning_rate=1e-4,
                          warmup_steps=10, weight_decay=0.0, log_every=10),
        dpo=DPOConfig(paths="runs/pairs/train.jsonl", eval_paths="runs/pairs/eval.jsonl",
                      beta=0.1, eval_every=20),
        checkpoint=CheckpointConfig(every=50),
        workdir="runs/tiny_dpo",
        init_from=pretrain.workdir,
    )
