"""GPU benchmark: jaxllm's train step against PyTorch on one card, in one run.

    python benchmarks/gpu.py --out gpu.json          # one GPU, under the 10-minute budget
    python benchmarks/gpu.py --tiny --out gpu.json   # every section at toy sizes, on a CPU

Every section runs in its own process (JAX's and PyTorch's allocators never share the card),
with its own timeout, all under one budget (`--budget`), of which each section leaves half
of their timeouts to those after it (`section_timeout`); the results JSON is rewritten
after every section, so a section that crashes or runs out of time loses nothing measured
before.

1. matmul: the measured bf16 peak of an 8192^3 matmul, and the card's spec-sheet peak
   (`jaxllm.train.flops.KNOWN_PEAK_FLOPS`; an unknown card has MFU against the measured
   peak only).
2. attention: fwd+bwd of one causal attention call at the Llama's head shape, bf16, for
   every kernel in `jaxllm.nn.attention_kernels.KERNELS` but auto and splash.
3. jaxllm: a Llama of d 2048, 16 layers, 16 query / 8 kv heads of 128, SwiGLU 5632, vocab
   32000 (`gpu_models.llama`), batch 8 x 2048, bf16 compute on float32 params, AdamW, clip
   1.0, remat save_dots and the attention section's fastest accurate kernel (`--remat`,
   `--attention`), built as `jaxllm.train.loop` builds it: compile seconds, tokens/s over
   the timed steps after the warm-up, MFU with the model FLOPs of
   `flops.train_flops_per_token` (6N + 12 L H D S, PaLM), and the top kernels of two
   traced steps (`kernel_profile.top_kernels`).
4. torch_eager, torch_compile: the same model as transformers' LlamaForCausalLM (its config
   from jaxllm's HF mapping), float32 master weights, bf16 autocast, SDPA attention, fused
   AdamW with the same settings, clip 1.0, the same tokens per step; eager and
   torch.compile'd. Its parameter count must equal jaxllm's; its top kernels are traced
   with torch.profiler.
5. moe_e8, moe_e64: a dense model of the MoE model's active parameters, then jaxllm MoE
   models (E=8, k=2 and E=64, k=6) with each dropless kernel that runs on GPU, `auto`'s
   first and ragged_dot last: tokens/s of the train step. `auto` is the kernel
   `jaxllm.nn.experts.resolve_kernel` picks here; its model's top kernels are traced as
   the dense Llama's are.

Then the markdown tables, each goal with its figure and pass or fail, and the environment.
The exit status is 1 where a section failed, timed out or was skipped, or where the
parameter counts differ.
"""

import argparse
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

import gpu_report
from gpu_models import run_settings
from timing import command

# Section -> its timeout in seconds on one GPU, in the order they run.
TIMEOUTS = {"matmul": 60, "attention": 90, "jaxllm": 180, "torch_eager": 90,
            "torch_compile": 240, "moe_e8": 180, "moe_e64": 180}
TINY_TIMEOUT = 300  # every section at toy sizes on a CPU
MIN_SECTION_S = 20  # a section starts only with this much of the budget left
RESERVE = 0.5  # of the later sections' timeouts, kept from the budget of each section
TORCH_SECTIONS = ("torch_eager", "torch_compile")
NO_LLVM_OPT = "--xla_backend_optimization_level=0"
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "torch", "transformers")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu.json", help="results JSON")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU")
    parser.add_argument("--sections", default=",".join(TIMEOUTS),
                        help="comma-separated sections to run, of " + ",".join(TIMEOUTS))
    parser.add_argument("--budget", type=float, default=560, help="seconds for all sections")
    parser.add_argument("--batch", type=int, help="sequences per step (default 8; tiny 2)")
    parser.add_argument("--steps", type=int, help="timed steps of the dense model")
    parser.add_argument("--remat", choices=("none", "full", "save_dots"), default="save_dots",
                        help="jaxllm's rematerialisation of the dense model")
    parser.add_argument("--attention", default="fastest",
                        help="jaxllm's attention kernel: a name, auto, or fastest (the "
                             "attention section's fastest accurate kernel; auto without one)")
    parser.add_argument("--section", choices=tuple(TIMEOUTS), help=argparse.SUPPRESS)
    parser.add_argument("--out-part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.sections.split(",")) - set(TIMEOUTS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    return args


def section_function(name: str):
    """The generator of section `name`, imported in its own process only: the parent runs
    no framework code, and a PyTorch section never loads jaxllm's kernels."""
    if name in TORCH_SECTIONS:
        from gpu_torch import SECTIONS
    else:
        from gpu_jax import SECTIONS
    return SECTIONS[name]


def write_json(path: str, data: dict) -> None:
    """Writes `data` whole or not at all: a timeout may kill the writer at any moment."""
    temporary = Path(f"{path}.tmp")
    temporary.write_text(json.dumps(data, indent=2))
    temporary.replace(path)


def run_child(args: argparse.Namespace) -> None:
    """Runs one section, rewriting its results to --out-part after every figure."""
    args.run = run_settings(args.tiny, batch=args.batch, steps=args.steps)
    part = {}
    try:
        for key, value in section_function(args.section)(args):
            part[key] = value
            write_json(args.out_part, part)
            print(f"{args.section}: {key} = {str(value)[:300]}", flush=True)
    except Exception as failure:
        part["error"] = f"{type(failure).__name__}: {failure}"[:2000]
        part["traceback"] = traceback.format_exc()[-3000:]
        write_json(args.out_part, part)
        raise


def attention_kernel(choice: str, sections: dict) -> str:
    """jaxllm's attention kernel for `--attention choice`, given the sections run so far."""
    if choice != "fastest":
        return choice
    return gpu_report.fastest_attention(sections) or "auto"


def child_command(name: str, args: argparse.Namespace, part: str, attention: str) -> list[str]:
    cmd = [sys.executable, __file__, "--section", name, "--out-part", part,
           "--remat", args.remat, "--attention", attention]
    cmd += ["--tiny"] if args.tiny else []
    for flag in ("batch", "steps"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    return cmd


def child_environment(name: str, tiny: bool) -> dict:
    """The PyTorch sections keep JAX (jaxllm's config and FLOP count) off the card; the JAX
    sections may take 90% of its memory. At toy sizes XLA skips LLVM's optimisation passes,
    which would cost more compile time than they save."""
    env = dict(os.environ)
    if name in TORCH_SECTIONS:
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    if tiny and NO_LLVM_OPT not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {NO_LLVM_OPT}".strip()
    return env


def run_section(name: str, args: argparse.Namespace, timeout: float, attention: str) -> dict:
    """The section's results, its wall seconds and status, from a process of its own that is
    killed after `timeout` seconds; whatever it started is killed with it."""
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.json"
        start = time.perf_counter()
        process = subprocess.Popen(child_command(name, args, str(part), attention),
                                   env=child_environment(name, args.tiny), start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        result = json.loads(part.read_text()) if part.exists() else {}
    if status == "ok" and "error" in result:
        status = "error"
    return {**result, "status": status, "wall_s": time.perf_counter() - start}


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def card() -> str | None:
    """The GPU's name from nvidia-smi, None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False, cwd=Path(__file__).parent).stdout.strip()
    versions = {name: v for name in PACKAGES if (v := version(name))}
    return {"card": card(), "versions": versions, "commit": commit,
            "date": datetime.date.today().isoformat(), "cpus": os.cpu_count()}


def section_timeout(own: float, later: list[str], left: float) -> float:
    """A section's timeout: its `own`, less what the `left` seconds of the budget must keep
    for the `later` sections (`RESERVE` of their timeouts), but at least MIN_SECTION_S."""
    reserve = RESERVE * sum(TIMEOUTS[name] for name in later)
    return min(own, left, max(left - reserve, MIN_SECTION_S))


def run_all(args: argparse.Namespace) -> dict:
    """Runs every section under the budget, rewriting args.out after each."""
    results = {"environment": environment(), "command": command(), "tiny": args.tiny,
               "budget_s": args.budget, "sections": {}}
    start = time.perf_counter()
    names = args.sections.split(",")
    for index, name in enumerate(names):
        left = args.budget - (time.perf_counter() - start)
        if left < MIN_SECTION_S:
            results["sections"][name] = {"status": "skipped: budget spent"}
        else:
            print(f"== {name}", flush=True)
            timeout = section_timeout(TINY_TIMEOUT if args.tiny else TIMEOUTS[name],
                                      names[index + 1:], left)
            attention = attention_kernel(args.attention, results["sections"])
            results["sections"][name] = run_section(name, args, timeout, attention)
        results["goals"] = gpu_report.goals(results["sections"])
        write_json(args.out, results)
    results["total_s"] = time.perf_counter() - start
    write_json(args.out, results)
    return results


def main() -> None:
    args = parse_args()
    if args.section:
        run_child(args)
        return
    results = run_all(args)
    print(f"\n{gpu_report.markdown(results)}\n\nTotal {results['total_s']:.0f} s.")
    failed = [name for name, r in results["sections"].items() if r["status"] != "ok"
              and r["status"] != "error"]
    if failed or gpu_report.params_equal(results["sections"]) is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
