"""Train-step memory of LoRA against full fine-tuning of the same model, from XLA's memory
analysis of the compiled step.

    python benchmarks/lora_memory.py                            # small_dense on CPU
    python benchmarks/lora_memory.py --topology v5p-8 --mesh.fsdp 4  # also for a TPU slice

The model is `presets.small_dense` (4 layers, d 512, vocab 32k) with a batch of 8 x 512
tokens; LoRA is `model.lora` rank 16 on q, k, v, o and the dense MLP. The pretraining step
(the SFT step) is lowered from shapes (`jaxllm.compile.aot.compile_step`, the step
`jaxllm compile` reports) and compiled, for the local CPU and optionally for a Cloud TPU
topology through libtpu; nothing is allocated or run. The figures are the compiler's exact
accounting per device: arguments (params, optimizer state, batch), temporaries
(activations, gradients, workspace), and their sum less the outputs aliased to donated
arguments.
"""

import argparse
import dataclasses

import jax
from timing import MIB, command, load, machine, table

from jaxllm import parallel, presets
from jaxllm.compile import aot
from jaxllm.compile.topology import parse
from jaxllm.config import Config, LoRAConfig, MeshConfig, TrainConfig


def configs(rank: int, batch: int, seq_len: int, fsdp: int) -> dict[str, Config]:
    base = Config(model=presets.small_dense(), mesh=MeshConfig(data=-1, fsdp=fsdp),
                  train=TrainConfig(batch_size=batch, seq_len=seq_len))
    lora = dataclasses.replace(base.model, lora=LoRAConfig(rank=rank, alpha=2.0 * rank))
    return {"full fine-tuning": base, f"LoRA r={rank}": dataclasses.replace(base, model=lora)}


def measure(config: Config, devices) -> aot.Memory:
    config = dataclasses.replace(config, mesh=dataclasses.replace(
        config.mesh, data=len(devices) // config.mesh.fsdp))
    return aot.memory_of(aot.compile_step(config, parallel.make_mesh(config, devices)))


def rows(target: str, memories: dict[str, aot.Memory]) -> list[tuple]:
    full = next(iter(memories.values())).total
    return [(target, name, f"{m.arguments / MIB:,.1f}", f"{m.temporaries / MIB:,.1f}",
             f"{m.total / MIB:,.1f}", f"{m.total / full:.3f}") for name, m in memories.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--topology", help="also compile for this Cloud TPU slice, e.g. v5p-8")
    parser.add_argument("--mesh.fsdp", dest="fsdp", type=int, default=1,
                        help="fsdp axis of the TPU mesh (the rest is data)")
    args = parser.parse_args()
    print(machine(load()))
    targets = {"CPU (1 device)": (jax.devices()[:1], 1)}
    if args.topology:
        targets[f"TPU {args.topology}"] = (parse(args.topology).devices(), args.fsdp)
    cells = []
    for target, (devices, fsdp) in targets.items():
        memories = {name: measure(config, devices) for name, config in
                    configs(args.rank, args.batch, args.seq_len, fsdp).items()}
        cells += rows(target, memories)
        print(f"{target}: done", flush=True)
    print(f"\n`{command()}`\n")
    print(table(("compiled for", "run", "arguments MiB", "temporaries MiB",
                 "total MiB per device", "vs full"), cells))


if __name__ == "__main__":
    main()
