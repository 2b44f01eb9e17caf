"""The TPU tables of docs/tpu.md, from ahead-of-time compiles through libtpu on any machine.

For each preset: the smallest listed slice of one generation that its train step fits on
(FSDP over every chip, expert parallelism for MoE as `calculator.suggested_config` sets it,
bf16, full remat, one 8192-token row per batch shard), the compiler's estimated step time
and MFU bound there, and the same step with naive attention beside the default kernel
(`auto`: splash on TPU). Every time is the compiler's estimate (`optimal_seconds`), not a
measurement. Writes JSON rows, then prints the markdown tables.

    python benchmarks/tpu_compile.py --generation v5p --presets llama3_8b,mixtral_8x7b
    python benchmarks/tpu_compile.py --maxtext   # the Llama-3-8B case MaxText is compared on
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jax

from jaxllm import calculator, parallel, presets
from jaxllm import config as config_lib
from jaxllm.compile import aot, topology

SEQ_LEN = 8192


def preset_config(name: str, chips: int, kernel: str = "auto") -> config_lib.Config:
    """The preset on `chips` chips at 8k context, with `kernel` attention."""
    config = calculator.suggested_config(presets.PRESETS[name](), chips)
    model = config.model
    model = dataclasses.replace(
        model, attention=dataclasses.replace(model.attention, kernel=kernel))
    train = dataclasses.replace(config.train, seq_len=SEQ_LEN)
    return dataclasses.replace(config, model=model, train=train)


def arguments_fit(config: config_lib.Config, slice_: topology.Topology) -> bool:
    """Whether params and optimizer state alone (exactly the compiled arguments) fit: a slice
    that fails this is not worth a compile."""
    memory = calculator.memory(config, parallel.validate_for_devices(config, slice_.chips))
    return memory.params + memory.optimizer <= slice_.generation.hbm_bytes


def smallest_fit(name: str, generation: str, log) -> tuple[topology.Topology, aot.Report] | None:
    """The smallest slice of `generation` whose devices hold the preset's step, and its report
    with the step cost; None when even the largest does not."""
    for size in topology.GENERATIONS[generation].grids:
        slice_ = topology.parse(f"{generation}-{size}")
        config = preset_config(name, slice_.chips)
        if not arguments_fit(config, slice_):
            continue
        try:
            report = aot.compile_for(config, slice_, cost=False)
        except (topology.NotFitting, config_lib.ConfigError) as error:
            log(f"{name} on {slice_.name}: {error}")
            continue
        log(f"{name} on {slice_.name}: {aot.gib(report.memory.total)} of "
            f"{aot.gib(report.hbm_bytes)}")
        if report.fits:
            return slice_, aot.with_cost(report, config, slice_)
    return None


def row(name: str, kernel: str, slice_: topology.Topology, report: aot.Report) -> dict:
    m = report.memory
    return {
        "preset": name, "kernel": kernel, "slice": slice_.name, "mesh": report.mesh,
        "remat": "full", "arguments_gib": m.arguments / 2**30,
        "temporaries_gib": m.temporaries / 2**30, "total_gib": m.total / 2**30,
        "hbm_gib": report.hbm_bytes / 2**30, "fits": report.fits,
        "est_step_s": report.step_seconds, "est_mfu_bound": report.mfu_bound,
        "compiled_optimal_seconds": report.to_json()["compiled_cost"]["optimal_seconds"],
    }


def naive_row(name: str, slice_: topology.Topology, log) -> dict:
    """The same step with naive attention: its memory, and its estimate if it fits."""
    config = preset_config(name, slice_.chips, kernel="naive")
    try:
        report = aot.compile_for(config, slice_, cost=False)
    except topology.NotFitting as error:
        log(f"{name} naive on {slice_.name}: {error}")
        return {"preset": name, "kernel": "naive", "slice": slice_.name, "fits": False,
                "error": str(error)}
    if report.fits:
        report = aot.with_cost(report, config, slice_)
    return row(name, "naive", slice_, report)


def maxtext_case(kernel: str) -> dict:
    """Llama-3-8B on 8 v5p chips (v5p-16), fsdp=8, batch 8 x 8192, bf16, full remat: the case
    MaxText's `train_compile` was run on (docs/tpu.md)."""
    slice_ = topology.parse("v5p-16")
    config = config_lib.Config(
        model=dataclasses.replace(presets.llama3_8b(), dtype="bfloat16", remat="full"),
        mesh=config_lib.MeshConfig(data=1, fsdp=8),
        train=config_lib.TrainConfig(batch_size=8, seq_len=SEQ_LEN),
    )
    config = config_lib.apply_overrides(config, [f"model.attention.kernel={kernel}"])
    return row("llama3_8b (MaxText case)", kernel, slice_, aot.compile_for(config, slice_))


def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False, cwd=Path(__file__).parent).stdout.strip()
    try:
        libtpu = metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        libtpu = "not installed"
    return {"commit": commit, "date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "libtpu": libtpu, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}


def markdown(rows: list[dict]) -> str:
    lines = ["| preset | kernel | slice | mesh | args GiB | temps GiB | total / HBM GiB | "
             "est. step s | est. MFU bound |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['kernel']} | {r['slice']} | | | | does not "
                         "fit | | |")
            continue
        mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        step = f"{r['est_step_s']:.3g}" if r["est_step_s"] else "-"
        mfu = f"{r['est_mfu_bound']:.1%}" if r["est_mfu_bound"] else "-"
        lines.append(f"| {r['preset']} | {r['kernel']} | {r['slice']} | {mesh} | "
                     f"{r['arguments_gib']:.1f} | {r['temporaries_gib']:.1f} | "
                     f"{r['total_gib']:.1f} / {r['hbm_gib']:.0f} | {step} | {mfu} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generation", default="v5p", choices=sorted(topology.GENERATIONS))
    parser.add_argument("--presets", default=",".join(
        n for n in presets.PRESETS if not n.startswith(("tiny", "small"))))
    parser.add_argument("--maxtext", action="store_true",
                        help="only the Llama-3-8B case compared with MaxText")
    parser.add_argument("--out", default="tpu_compile.json")
    args = parser.parse_args()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    env = environment()  # at the start: the commit whose code this process imported
    rows = []
    if args.maxtext:
        rows = [maxtext_case(kernel) for kernel in ("auto", "blockwise", "naive")]
    for name in [] if args.maxtext else args.presets.split(","):
        found = smallest_fit(name, args.generation, log)
        if found is None:
            rows.append({"preset": name, "kernel": "auto", "slice": f"> {args.generation}",
                         "fits": False, "error": "fits no listed slice"})
            continue
        slice_, report = found
        rows += [row(name, "auto", slice_, report), naive_row(name, slice_, log)]
        with open(args.out, "w") as f:  # after every preset: nothing lost on a crash
            json.dump({"environment": env, "rows": rows}, f, indent=2)
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=2)
    print(json.dumps(env))
    print(markdown(rows))


if __name__ == "__main__":
    main()
