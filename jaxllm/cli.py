"""The `jaxllm` command (also `python -m jaxllm`)."""

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable

from jaxllm import config as config_lib
from jaxllm.compile.topology import NotFitting, TopologyError
from jaxllm.convert.hf_config import FAMILIES, ConversionError


def _initialize_processes(args) -> None:
    from jaxllm import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def _pretrain(args) -> None:
    from jaxllm.train.loop import pretrain

    _initialize_processes(args)
    pretrain(_config_of(args.experiment, args.overrides))


def _phase(module: str, name: str) -> Callable:
    """The command that runs the phase `module.name` on an experiment file with overrides;
    the module is imported only when the command runs."""

    def run(args) -> None:
        phase = getattr(importlib.import_module(module), name)
        _initialize_processes(args)
        config = config_lib.load_experiment(args.experiment)
        phase(config_lib.apply_overrides(config, args.overrides))

    return run


def _constitution(args) -> None:
    from jaxllm.config import DEFAULT_PRINCIPLES
    from jaxllm.post.constitution import constitution
    from jaxllm.post.principles import read_principles

    config = _config_of(args.experiment, args.overrides)
    principles = read_principles(args.principles) if args.principles else DEFAULT_PRINCIPLES
    constitution(config, principles)


def _sampler(target: str):
    """(config, Sampler) of the latest checkpoint of a workdir, or of the workdir of an
    experiment file."""
    from jaxllm.infer import Sampler
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.train.run import load_run

    workdir = config_lib.load_experiment(target).workdir if target.endswith(".py") else target
    if workdir is None:
        raise config_lib.ConfigError(f"workdir: {target} sets none; give the run's workdir")
    config, model, state = load_run(workdir)
    tokenizer = load_tokenizer(config.data.tokenizer)
    return config, Sampler(model, state.params, tokenizer, moe_bias=state.moe_bias)


def _generate(args) -> None:
    import jax

    from jaxllm.infer.stream import stream

    config, sampler = _sampler(args.workdir)
    tokenizer = sampler.tokenizer
    prompt, patches = _prompt(args, config, tokenizer)
    if args.effort is not None:
        if sampler.think is None:
            raise config_lib.ConfigError("--effort: the vocabulary has no <think> and </think>")
        prompt.append(sampler.think.open)
    toolbox = _toolbox(args, tokenizer)
    echo = prompt if getattr(tokenizer, "chat_template", None) else prompt[1:]  # no <bos>
    patch = tokenizer.special.get("<patch>")
    echo = [t for t in echo if t != patch]
    text = tokenizer.decode(echo)
    print(text, end="", flush=True)
    tokens = stream(sampler, prompt, max_new_tokens=args.max_new_tokens,
                    rng=jax.random.key(args.seed), temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, effort=args.effort, toolbox=toolbox,
                    patches=patches)
    for text in _growing_text(tokenizer, echo, tokens):
        print(text, end="", flush=True)
    print()
    if toolbox is not None:
        toolbox.close()


def _growing_text(tokenizer, prompt: list[int], tokens):
    """The text each new token adds to the decoded prompt and the tokens before it, held
    back while it ends inside a character (a byte of a multi-byte one decodes as U+FFFD).
    Decoding the whole sequence keeps the spaces that a tokenizer drops at a text's start."""
    ids, shown = list(prompt), len(tokenizer.decode(prompt))
    text = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            yield text[shown:]
            shown = len(text)
    if len(text) > shown:
        yield text[shown:]


def _prompt(args, config: config_lib.Config, tokenizer):
    """(ids, patches) of `--prompt`, in the task template unless `--raw`; with `--image`, the
    image's span first (as the image corpus lays out a question) and its patches, else
    patches None."""
    from jaxllm.data import tasks
    from jaxllm.data.tokenizer import chat_prompt

    if args.image is None:
        text = args.prompt if args.raw else tasks.prompt(tasks.Problem("", args.prompt, ""))
        return chat_prompt(tokenizer, text), None
    from jaxllm.data import images
    from jaxllm.infer.image_prompt import image_prompt, read_prompt_image

    image = read_prompt_image(args.image, config)
    text = args.prompt if args.raw else images.prompt(
        images.ImageProblem("", args.prompt, "", "", image))
    return image_prompt(tokenizer, text, image, patch_size=config.model.vision.patch_size)


def _toolbox(args, tokenizer):
    """The built-in tools `--tools` names (comma-separated), or None."""
    if not args.tools:
        return None
    if args.effort is not None:
        raise config_lib.ConfigError("--tools: does not combine with budget forcing (--effort)")
    from jaxllm import tools
    from jaxllm.infer.tool_use import ToolTokens

    try:
        ToolTokens.from_tokenizer(tokenizer)
        return tools.toolbox([name.strip() for name in args.tools.split(",")])
    except ValueError as error:
        raise config_lib.ConfigError(f"--tools: {str(error).removeprefix('tools: ')}") from None


def _eval(args) -> None:
    import json

    import jax

    from jaxllm.rl import sweep, visual
    from jaxllm.rl.evaluate import evaluate
    from jaxllm.rl.loop import task_problems
    from jaxllm.train import workdir as workdir_lib

    config, sampler = _sampler(args.workdir)
    problems = task_problems(config, args.split)[: args.problems]
    rng = jax.random.key(args.seed)
    options = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    if not (args.sweep or args.control):
        result = evaluate(sampler, problems, effort=args.effort, votes=args.votes, rng=rng,
                          **options)
        print(json.dumps(result, indent=2))
        if problems and visual.is_image(problems[0]):
            print(visual.markdown(visual.chance_table(result, problems)))
        return
    out = workdir_lib.path(args.workdir, "sweep")  # a local or a gs:// workdir
    if args.control:
        name = "control"
        rows = sweep.control_sweep(sampler, problems, levels=config_lib.EFFORT_LEVELS, rng=rng,
                                   **options)
        figure = sweep.control_plot({args.workdir: rows}, out / "control.png")
    else:
        name = "sweep"
        try:
            efforts = sweep.budgets(args.budgets)
        except ValueError as error:
            raise config_lib.ConfigError(f"--{error}") from None
        rows = sweep.sweep(sampler, problems, efforts=efforts,
                           votes=args.votes_list, rng=rng, **options)
        figure = sweep.plot(rows, out / "sweep.png")
    workdir_lib.write_text(out / f"{name}.md", sweep.table(rows) + "\n")
    workdir_lib.write_text(out / f"{name}.json", json.dumps(rows, indent=2) + "\n")
    print(sweep.table(rows))
    print(f"wrote {out / f'{name}.md'}, {out / f'{name}.json'} and {figure}")


def _demo(args) -> None:
    if args.constitution:
        from jaxllm.post.constitution_demo import demo
    else:
        from jaxllm.demo import demo

    demo(args.workdir, args.overrides)


def _plot(args) -> None:
    from jaxllm.plot import plot_run

    for path in plot_run(args.workdir):
        print(f"wrote {path}")


def _params(args) -> None:
    import json

    import jax

    from jaxllm import calculator, presets

    if args.presets:
        names = [n for n in presets.PRESETS if not n.startswith(("tiny", "small"))]
        rows = calculator.preset_rows(names)
        print(json.dumps(rows, indent=2) if args.json else calculator.format_presets(rows))
        return
    if args.budget is not None:
        plan = calculator.compute_optimal(args.budget)
        print(json.dumps(plan, indent=2) if args.json else calculator.format_plan(plan))
        return
    if args.target is None:
        raise config_lib.ConfigError("params: give a preset name, an experiment file or --budget")
    config = _config_of(args.target, args.overrides)
    report = calculator.calculate(config, args.devices or jax.device_count(), args.context)
    if args.json:
        print(json.dumps(calculator.to_json(report), indent=2))
    else:
        print(calculator.format_report(report))


def _compile(args) -> None:
    import json

    from jaxllm.compile import aot, search, topology

    config = _config_of(args.target, args.overrides)
    slice_ = topology.parse(args.topology, args.slices)
    if args.search:
        ranked = search.search(config, slice_, log=lambda line: print(line, file=sys.stderr))
        if not ranked:
            raise NotFitting(f"no candidate fits {slice_.name}: try a larger slice")
        best, report = ranked[0]
        overrides = " ".join(best.overrides(slice_.slices))
        if args.json:
            print(json.dumps({"ranking": [dict(dataclasses.asdict(c), **r.to_json())
                                          for c, r in ranked], "overrides": overrides}, indent=2))
        else:
            print(search.format_ranking(ranked))
            print(f"best: {overrides}")
        return
    report = aot.compile_for(config, slice_)
    print(json.dumps(report.to_json(), indent=2) if args.json else aot.format_report(report))
    if not report.fits:
        needed, hbm = aot.gib(report.memory.total), aot.gib(report.hbm_bytes)
        raise NotFitting(f"the step does not fit {slice_.name}: it needs {needed} per device "
                         f"of {hbm}")


def _config_of(target: str, overrides: list[str]) -> config_lib.Config:
    """The config of an experiment file or of a preset (`presets.run_config`), with
    `overrides` applied."""
    from jaxllm import presets

    if target.endswith(".py"):
        config = config_lib.load_experiment(target)
    elif target in presets.PRESETS:
        config = presets.run_config(target)
    else:
        raise config_lib.ConfigError(
            f"{target!r} is neither an experiment file (.py) nor a preset; "
            f"presets are {sorted(presets.PRESETS)}"
        )
    return config_lib.apply_overrides(config, overrides)


def _convert(args) -> None:
    from jaxllm.convert import export_hf, import_hf

    if args.direction == "hf-import":
        import_hf(args.source, args.out, args.overrides)
    else:
        export_hf(args.source, args.out, args.family, args.overrides)


def _add_experiment_command(commands, name: str, help: str, run,
                            target: str = "path to an experiments/*.py file") -> None:
    command = commands.add_parser(name, help=help)
    command.add_argument("experiment", help=target)
    command.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.steps=50")
    processes = command.add_argument_group(
        "multi-process", "for GPU clusters and local tests; TPU VMs are detected automatically"
    )
    processes.add_argument("--coordinator", help="host:port of process 0")
    processes.add_argument("--num-processes", type=int)
    processes.add_argument("--process-id", type=int)
    command.set_defaults(run=run)


def _at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of `kind` no less than `minimum`."""

    def parse(text: str):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value" names it
    return parse


def _probability(text: str) -> float:
    """An argparse type: a float in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def _int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1."""
    return [_at_least(1)(item) for item in text.split(",")]


_probability.__name__ = "float"
_int_list.__name__ = "comma-separated integers"


def _add_sampling_options(command) -> None:
    command.add_argument("--temperature", type=_at_least(0, float), default=1.0,
                         help="0 is greedy")
    command.add_argument("--max-new-tokens", type=_at_least(1), default=96)
    command.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_experiment_command(commands, "pretrain", "pretrain the model of an experiment file "
                            "or a preset", _pretrain,
                            target="an experiments/*.py file, or a preset name: its model with "
                            "the default settings, workdir runs/NAME")
    _add_experiment_command(commands, "grpo", "the RL phase: GRPO on the reasoning tasks, "
                            "from init_from=WORKDIR", _phase("jaxllm.rl.loop", "grpo"))
    _add_experiment_command(commands, "sft", "supervised fine-tuning on chat or prompt/response "
                            "records (data.source=chat), from init_from=WORKDIR",
                            _phase("jaxllm.train.sft", "sft"))
    _add_experiment_command(commands, "dpo", "DPO on preference pairs (dpo.paths), from "
                            "init_from=WORKDIR", _phase("jaxllm.post.dpo", "dpo"))
    _add_experiment_command(commands, "distill", "distillation: a student learns from "
                            "distill.teacher=WORKDIR's logits",
                            _phase("jaxllm.post.distill", "distill"))

    constitution = commands.add_parser(
        "constitution", help="Constitutional AI: responses, critiques and revisions, SFT, AI "
        "feedback, DPO, from init_from=WORKDIR; one process")
    constitution.add_argument("experiment", help="path to an experiments/*.py file")
    constitution.add_argument("overrides", nargs="*", help="key.sub=value, e.g. "
                              "constitution.sft_steps=50")
    constitution.add_argument("--principles", help="a text (one a line) or YAML file of "
                              "principles (default: the four of docs/post_training.md)")
    constitution.set_defaults(run=_constitution)

    generate = commands.add_parser("generate", help="stream a completion from a run's model")
    generate.add_argument("workdir", help="a run's workdir, holding checkpoints, or the "
                          "experiment file that names it")
    generate.add_argument("--prompt", required=True, help='a question, e.g. "12*34=?"')
    generate.add_argument("--image", help="an image file (PNG, JPEG, ...) the question is "
                          "about, for a model with model.vision.image_size > 0; it goes "
                          "first, or where a --raw prompt writes <image>")
    generate.add_argument("--raw", action="store_true",
                          help="use the prompt as is, without the task template")
    generate.add_argument("--effort", choices=("instant", "low", "medium", "high", "auto"),
                          help="open a thought and cap it at this effort's token budget")
    generate.add_argument("--tools", help="built-in tools the model may call inside its "
                          "thinking, comma-separated: calc,countdown; calls and results are "
                          "shown as they happen")
    generate.add_argument("--top-k", type=_at_least(1))
    generate.add_argument("--top-p", type=_probability)
    _add_sampling_options(generate)
    generate.set_defaults(run=_generate)

    evaluate = commands.add_parser("eval", help="held-out accuracy of a run's model")
    evaluate.add_argument("workdir", help="a run's workdir, holding checkpoints")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--problems", type=_at_least(1), default=200,
                          help="the first N of the split")
    evaluate.add_argument("--effort", choices=("instant", "low", "medium", "high", "auto"))
    evaluate.add_argument("--votes", type=_at_least(1), default=1,
                          help="self-consistency samples")
    evaluate.add_argument("--sweep", action="store_true",
                          help="every budget x vote count: a table and a PNG in WORKDIR/sweep")
    evaluate.add_argument("--control", action="store_true",
                          help="sweep the effort control tokens instead, unforced: accuracy "
                          "and thinking tokens per level, in WORKDIR/sweep/control.*")
    evaluate.add_argument("--budgets", default="0,8,16,32,64",
                          help="sweep: thinking-token budgets, comma-separated")
    evaluate.add_argument("--votes-list", type=_int_list, default=[1, 4, 16],
                          help="sweep: vote counts, comma-separated")
    _add_sampling_options(evaluate)
    evaluate.set_defaults(run=_eval)

    demo = commands.add_parser(
        "demo", help="the mission on CPU: pretrain, evaluate, GRPO, evaluate, effort sweep"
    )
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("--constitution", action="store_true",
                      help="the Constitutional AI demo instead: harmful compliance, benign "
                      "refusals and accuracy before and after the pipeline")
    demo.add_argument("overrides", nargs="*",
                      help="pretrain.* / rl.* overrides, e.g. pretrain.train.steps=100")
    demo.set_defaults(run=_demo)

    convert = commands.add_parser("convert", help="Hugging Face checkpoints in and out")
    convert.add_argument("direction", choices=("hf-import", "hf-export"))
    convert.add_argument("source", help="hf-import: an HF checkpoint directory (safetensors); "
                         "hf-export: a run's workdir")
    convert.add_argument("--out", required=True,
                         help="hf-import: the workdir to write; hf-export: the HF directory")
    convert.add_argument("--family", choices=sorted(FAMILIES),
                         help="hf-export: the HF model family (default: the imported one)")
    convert.add_argument("overrides", nargs="*",
                         help="key.sub=value, e.g. mesh.fsdp=8: hf-import's run, or the mesh "
                         "hf-export restores onto (default one device)")
    convert.set_defaults(run=_convert)

    plot = commands.add_parser("plot", help="write PNG curves of a run into WORKDIR/plots")
    plot.add_argument("workdir", help="a run's workdir, holding metrics.jsonl")
    plot.set_defaults(run=_plot)

    params = commands.add_parser(
        "params", help="parameters, FLOPs, KV cache and memory per device, without allocating"
    )
    params.add_argument("target", nargs="?", help="a preset name or an experiments/*.py file")
    params.add_argument("overrides", nargs="*", help="key.sub=value, e.g. mesh.fsdp=256")
    params.add_argument("--devices", type=int,
                        help="size the mesh for this many devices (default: the ones present)")
    params.add_argument("--context", type=int, help="KV-cache length (default: train.seq_len)")
    params.add_argument("--budget", type=float,
                        help="FLOPs: print the compute-optimal parameters and tokens instead")
    params.add_argument("--json", action="store_true", help="print JSON instead of a table")
    params.add_argument("--presets", action="store_true",
                        help="one row per published preset, with its fit on 256 v5p / v5e chips")
    params.set_defaults(run=_params)

    compile_ = commands.add_parser(
        "compile", help="compile the train step for a Cloud TPU slice, on any machine: memory "
        "per chip, fits or not, estimated step time")
    compile_.add_argument("target", help="an experiments/*.py file or a preset name")
    compile_.add_argument("overrides", nargs="*", help="key.sub=value, e.g. mesh.fsdp=64")
    compile_.add_argument("--topology", required=True,
                          help="a Cloud TPU slice: v4-N, v5p-N, v5e-N (v5litepod-N), v6e-N")
    compile_.add_argument("--slices", type=int, default=1, help="multislice: slices over DCN")
    compile_.add_argument("--search", action="store_true",
                          help="rank remat x grad_accum x mesh splits that fit, best first")
    compile_.add_argument("--json", action="store_true", help="print JSON instead of a table")
    compile_.set_defaults(run=_compile)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (`--topology v5p-8 mesh.fsdp=4`).
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        args.run(args)
    except config_lib.ConfigError as error:
        print(f"jaxllm: config error: {error}", file=sys.stderr)
        return 2
    except (TopologyError, NotFitting) as error:  # ValueErrors of jaxllm.compile
        print(f"jaxllm: {error}", file=sys.stderr)
        return 2
    except ConversionError as error:
        print(f"jaxllm: conversion error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"jaxllm: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from jaxllm.train.checkpoint import CheckpointError  # loaded by whatever raised

        if not isinstance(error, CheckpointError):
            raise
        print(f"jaxllm: checkpoint error: {error}", file=sys.stderr)
        return 2
    return 0
