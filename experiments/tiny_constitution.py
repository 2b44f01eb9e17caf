"""The Constitutional AI pipeline on the synthetic assistant domain, from a model pretrained
with its conversations (`jaxllm demo --constitution` runs both and measures them):

    jaxllm pretrain experiments/tiny_constitution.py workdir=runs/cai_pretrain \
        data.assistant_documents=8000 train.seq_len=512 train.batch_size=16 train.steps=400
    jaxllm constitution experiments/tiny_constitution.py init_from=runs/cai_pretrain \
        --principles principles.txt
"""

from jaxllm import Config
from jaxllm.post.constitution_demo import configs


def config() -> Config:
    _, pipeline = configs("runs")
    return pipeline
