"""`benchmarks/gpu.py --tiny` runs every section at toy sizes on a CPU, as CI runs it: the JSON
holds every section, jaxllm's and PyTorch's models count the same parameters, jaxllm's
model attends with the fastest attention kernel, every attention kernel's gradients and
every MoE kernel's loss agree with the others, every model trains at a positive rate, the
traced steps name their top kernels, and the tables print; and how the sections share the
budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH_SECTIONS = ("torch_eager", "torch_compile")
SECTIONS = ("matmul", "attention", "jaxllm", *TORCH_SECTIONS, "moe_e8", "moe_e64")


def positive_rates(results: dict) -> list[float]:
    """tokens/s of every model measured, and 1/seconds of every attention kernel timed."""
    sections = results["sections"]
    rates = [sections[name]["tokens_per_s"] for name in ("jaxllm", "torch_eager", "torch_compile")]
    for name in ("moe_e8", "moe_e64"):
        rates += [r["tokens_per_s"] for r in sections[name].values() if isinstance(r, dict)]
    rates += [1 / r["seconds"] for r in sections["attention"].values() if isinstance(r, dict)]
    return rates


@pytest.mark.slow
def test_tiny_run_measures_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny",
                          "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads(out.read_text())
    sections = results["sections"]
    assert tuple(sections) == SECTIONS
    assert all(sections[name]["status"] == "ok" for name in SECTIONS)
    counts = {sections[name]["params"] for name in ("jaxllm", "torch_eager", "torch_compile")}
    assert len(counts) == 1, counts
    kernels = [r for r in sections["attention"].values() if isinstance(r, dict)]
    assert len(kernels) >= 4 and all(r["relative_error"] < 2e-2 for r in kernels), kernels
    seconds = {name: r["seconds"] for name, r in sections["attention"].items()
               if isinstance(r, dict)}
    assert sections["jaxllm"]["attention_kernel"] == min(seconds, key=seconds.get)
    for name in ("moe_e8", "moe_e64"):  # every kernel from the same parameters and batch
        losses = [r["loss"] for key, r in sections[name].items()
                  if isinstance(r, dict) and key != "dense_active"]
        assert max(losses) - min(losses) < 1e-2, losses
    profiles = [sections[name]["top_kernels"] for name in ("jaxllm", *TORCH_SECTIONS)]
    profiles += [sections[name][sections[name]["auto"]]["top_kernels"]
                 for name in ("moe_e8", "moe_e64")]
    for profile in profiles:  # the traced steps' busy time is split between their kernels
        assert profile["busy_s"] > 0 and len(profile["kernels"]) == 12, profile
        shares = [k["share"] for k in profile["kernels"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0, profile
    rates = positive_rates(results)
    assert len(rates) >= 12 and all(rate > 0 for rate in rates), rates
    for header in ("| goal | figure | target | result |", "| shape | model |", "| kernel |",
                   "| model | kernel | ms per step |"):
        assert header in run.stdout
    assert "parameter counts, jaxllm = PyTorch | True | equal | pass" in run.stdout
    assert f"torch {results['environment']['versions']['torch']}" in run.stdout


def test_each_section_leaves_half_of_the_later_sections_timeouts(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu

    later = ["moe_e8", "moe_e64"]
    assert gpu.section_timeout(240, later, left=560) == 240  # 560 - 180 leaves room
    assert gpu.section_timeout(240, later, left=300) == 300 - 180
    assert gpu.section_timeout(180, ["moe_e64"], left=200) == 200 - 90
    assert gpu.section_timeout(180, later, left=100) == gpu.MIN_SECTION_S
    assert gpu.section_timeout(180, [], left=15) == 15
