"""The figures, goals and markdown tables of `benchmarks/gpu.py` from its sections' results."""

from collections.abc import Iterator

from timing import table

MFU_GOAL = 0.50
EAGER_GOAL = 1.2  # jaxllm tokens/s over PyTorch eager's
COMPILE_GOAL = 1.0  # ... over torch.compile's
MOE_GOALS = {"moe_e8": ("E=8, k=2", 1.5), "moe_e64": ("E=64, k=6", 2.0)}  # MoE / dense-active
TORCH = {"torch_eager": "PyTorch eager", "torch_compile": "PyTorch torch.compile"}
ACCURATE = 2e-2  # largest relative gradient error of an attention kernel the model may use


def fastest_attention(sections: dict) -> str | None:
    """The attention kernel of the least fwd+bwd time among those whose gradients are within
    `ACCURATE` of the naive kernel's, from the attention section; None where it timed none."""
    timed = {kernel: r["seconds"] for kernel, r in sections.get("attention", {}).items()
             if isinstance(r, dict) and r.get("relative_error", 1.0) < ACCURATE}
    return min(timed, key=timed.get, default=None)


def measured(sections: dict, name: str) -> dict | None:
    """The results of section `name` where it measured tokens/s, else None."""
    result = sections.get(name, {})
    return result if "tokens_per_s" in result else None


def peaks(sections: dict) -> tuple[float | None, float | None]:
    """(spec-sheet, measured) bf16 peak FLOP/s of the card, from the matmul section."""
    matmul = sections.get("matmul", {})
    return matmul.get("spec_peak"), matmul.get("measured_peak")


def mfu(result: dict | None, peak: float | None) -> float | None:
    if result is None or not peak:
        return None
    return result["tokens_per_s"] * result["per_token_flops"] / peak


def speedup(sections: dict, name: str) -> float | None:
    """jaxllm's tokens/s over section `name`'s."""
    jax_result, other = measured(sections, "jaxllm"), measured(sections, name)
    if jax_result is None or other is None:
        return None
    return jax_result["tokens_per_s"] / other["tokens_per_s"]


def moe_ratio(sections: dict, name: str, kernel: str | None = None) -> float | None:
    """Step time of the MoE model with `kernel` (default: the one auto stands for) over the
    dense-active model's, from tokens/s."""
    result = sections.get(name, {})
    moe = result.get(kernel or result.get("auto"), {})
    dense = result.get("dense_active", {})
    if "tokens_per_s" not in moe or "tokens_per_s" not in dense:
        return None
    return dense["tokens_per_s"] / moe["tokens_per_s"]


def params_equal(sections: dict) -> bool | None:
    """Whether jaxllm's and both PyTorch models' parameter counts are equal (None: none
    counted by one side)."""
    counts = {name: sections.get(name, {}).get("params") for name in ("jaxllm", *TORCH)}
    if counts["jaxllm"] is None or all(counts[name] is None for name in TORCH):
        return None
    return all(count in (None, counts["jaxllm"]) for count in counts.values())


def goal(name: str, value: float | None, target: float, at_least: bool,
         form: str = "{:.2f}") -> dict:
    """A goal, its figure and whether the figure meets it (None: not measured); `form`
    formats both for the table."""
    passed = None if value is None else (value >= target if at_least else value <= target)
    return dict(goal=name, value=value, figure=cell(value, form),
                target=f"{'>=' if at_least else '<='} {form.format(target)}", passed=passed)


def goals(sections: dict) -> list[dict]:
    """Each goal of the benchmark with its figure and whether it is met."""
    spec, measured_peak = peaks(sections)
    dense = measured(sections, "jaxllm")
    mfu_name = ("jaxllm MFU (spec peak)" if spec else
                "jaxllm MFU (no spec peak for this device: measured peak)")
    rows = [goal(mfu_name, mfu(dense, spec or measured_peak), MFU_GOAL, True, "{:.1%}"),
            goal("jaxllm / PyTorch eager tokens/s", speedup(sections, "torch_eager"),
                 EAGER_GOAL, True),
            goal("jaxllm / torch.compile tokens/s", speedup(sections, "torch_compile"),
                 COMPILE_GOAL, True)]
    for name, (shape, target) in MOE_GOALS.items():
        rows.append(goal(f"MoE {shape} (auto) / dense-active step time",
                         moe_ratio(sections, name), target, False))
    equal = params_equal(sections)
    rows.append(dict(goal="parameter counts, jaxllm = PyTorch", value=equal,
                     figure=cell(equal, "{}"), target="equal", passed=equal))
    return rows


def cell(value, form: str = "{:,.0f}") -> str:
    return "-" if value is None else form.format(value)


def verdict(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "not measured"}[passed]


def error(result: dict) -> str:
    """The status of a failed measurement and the first line of its error."""
    lines = result.get("error", "").strip().splitlines()
    status = result.get("status") or ("error" if lines else "not run")
    return f"{status}: {lines[0]}" if lines else status


def dense_table(sections: dict) -> str:
    spec, measured_peak = peaks(sections)
    rows = []
    for name, label in (("jaxllm", "jaxllm"), *TORCH.items()):
        result = sections.get(name, {})
        if name == "jaxllm" and "attention_kernel" in result:
            failed = [key.removeprefix("error_with_") for key in result
                      if key.startswith("error_with_")]
            label += (f" (remat {result['remat']}, attention {result['attention_kernel']}"
                      + "".join(f"; {kernel} failed" for kernel in failed) + ")")
        r = measured(sections, name)
        if r is None:
            rows.append((label, cell(result.get("params")), error(result), "", "", "", "", ""))
            continue
        rows.append((label, cell(r["params"]), cell(r.get("compile_s", r.get("first_step_s")),
                                                    "{:.1f}"),
                     cell(r["step_s"] * 1e3), cell(r["tokens_per_s"]),
                     cell(mfu(r, spec), "{:.1%}"), cell(mfu(r, measured_peak), "{:.1%}"),
                     cell(speedup(sections, name), "{:.2f}")))
    return table(("model", "params", "compile (jaxllm) / first step (PyTorch) s", "step ms",
                  "tokens/s", "MFU, spec peak", "MFU, measured peak", "jaxllm tokens/s / this"),
                 rows)


def goal_table(sections: dict) -> str:
    return table(("goal", "figure", "target", "result"),
                 [(g["goal"], g["figure"], g["target"], verdict(g["passed"]))
                  for g in goals(sections)])


def moe_table(sections: dict) -> str:
    rows = []
    for name, (shape, _) in MOE_GOALS.items():
        result = sections.get(name, {})
        models = {k: v for k, v in result.items() if isinstance(v, dict)}
        if result.get("status") != "ok":
            rows.append((shape, error(result), "", "", "", "", "", ""))
        for model, r in models.items():
            label = {"dense_active": "dense-active", result.get("auto"): f"{model} (auto)"}.get(
                model, model)
            if "tokens_per_s" not in r:
                rows.append((shape, label, "", "", "", "", "", error(r)))
                continue
            rows.append((shape, label, cell(r["params"]), cell(r.get("active_params")),
                         cell(r["step_s"] * 1e3), cell(r["tokens_per_s"]),
                         cell(r["loss"], "{:.4f}"),
                         cell(moe_ratio(sections, name, model), "{:.2f}")))
    # The MoE kernels start from the same parameters and batch: their losses should agree.
    return table(("shape", "model", "params", "active params", "step ms", "tokens/s",
                  "loss after the steps", "time / dense-active"), rows)


def attention_table(sections: dict) -> str:
    result = sections.get("attention", {})
    rows = [] if result.get("status") == "ok" else [("all", error(result), "", "", "")]
    for kernel, r in result.items():
        if not isinstance(r, dict):
            continue
        if "seconds" not in r:
            rows.append((kernel, error(r), "", "", ""))
            continue
        rows.append((kernel, cell(r["compile_s"], "{:.1f}"), cell(r["seconds"] * 1e3, "{:.2f}"),
                     cell(result["flops"] / r["seconds"] / 1e12, "{:.3g}"),
                     cell(r["relative_error"], "{:.1e}")))
    return table(("kernel", "compile s", "fwd+bwd ms", "TFLOP/s (12 B H D S^2)",
                  "grad error vs naive f32"), rows)


def profiled(sections: dict) -> Iterator[tuple[str, dict]]:
    """(label, results) of each model whose step was traced: the dense Llama in jaxllm and
    PyTorch, and the MoE models with the kernel auto stands for."""
    for name, label in (("jaxllm", "jaxllm"), *TORCH.items()):
        yield label, sections.get(name, {})
    for name, (shape, _) in MOE_GOALS.items():
        result = sections.get(name, {})
        yield f"MoE {shape}, {result.get('auto')}", result.get(result.get("auto"), {})


def kernel_table(sections: dict) -> str:
    """Each traced model's device busy time per step, then its top kernels."""
    rows = []
    for label, result in profiled(sections):
        profile = result.get("top_kernels")
        if profile is None or "busy_s" not in profile:
            rows.append((label, error(profile or {"status": "not traced"}), "", "", ""))
            continue
        rows.append((label, "(busy, summed over streams; share: of the step)",
                     cell(profile["busy_s"] * 1e3, "{:.1f}"), "",
                     cell(profile["busy_s"] / result["step_s"], "{:.1%}")))
        rows += [(label, f"`{k['name'].replace('|', '/')}`", cell(k["seconds"] * 1e3, "{:.2f}"),
                  cell(k["launches"], "{:g}"), cell(k["share"], "{:.1%}"))
                 for k in profile["kernels"]]
    return table(("model", "kernel", "ms per step", "launches per step", "share of busy time"),
                 rows)


def walls_line(sections: dict) -> str:
    """Each section's status and wall seconds, its process's start to end."""
    return "Sections, wall seconds: " + ", ".join(
        f"{name} {cell(r.get('wall_s'), '{:.0f}')} ({r.get('status', 'not run')})"
        for name, r in sections.items()) + "."


def environment_line(results: dict) -> str:
    env = results["environment"]
    card = env.get("card") or results["sections"].get("matmul", {}).get("device_kind", "?")
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    return (f"Card: {card}; {versions}; commit {env['commit']}; {env['date']}; "
            f"`{results['command']}`")


def markdown(results: dict) -> str:
    """The tables of a run: the dense step, the goals, MoE, attention, the traced kernels; then
    the matmul peak, the sections' wall times and the environment."""
    sections = results["sections"]
    spec, measured_peak = peaks(sections)
    size = sections.get("matmul", {}).get("size")
    return "\n\n".join([
        dense_table(sections), goal_table(sections), moe_table(sections),
        attention_table(sections), kernel_table(sections),
        f"bf16 matmul peak: measured {cell(measured_peak and measured_peak / 1e12, '{:.3g}')} "
        f"TFLOP/s ({size}^3), spec {cell(spec and spec / 1e12, '{:.3g}')} TFLOP/s.",
        walls_line(sections), environment_line(results),
    ])
