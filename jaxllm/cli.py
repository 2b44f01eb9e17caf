"""The `jaxllm` command (also `python -m jaxllm`)."""

import argparse
import sys

from jaxllm import config as config_lib
from jaxllm import presets


def _pretrain(args) -> None:
    from jaxllm.train.loop import pretrain

    config = config_lib.load_experiment(args.experiment)
    pretrain(config_lib.apply_overrides(config, args.overrides))


def _demo(args) -> None:
    from jaxllm.train.loop import pretrain

    config = config_lib.Config(
        model=presets.tiny_dense(),
        train=config_lib.TrainConfig(steps=150, batch_size=16, seq_len=128, log_every=10),
        workdir=args.workdir,
    )
    history = pretrain(config_lib.apply_overrides(config, args.overrides))
    first, last = history[0]["loss"], history[-1]["loss"]
    print(f"demo: loss fell from {first:.3f} to {last:.3f} over {config.train.steps} steps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain", help="pretrain the model an experiment file builds")
    pretrain.add_argument("experiment", help="path to an experiments/*.py file")
    pretrain.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.steps=50")
    pretrain.set_defaults(run=_pretrain)

    demo = commands.add_parser("demo", help="pretrain the tiny model on CPU and show the loss fall")
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.steps=50")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except config_lib.ConfigError as error:
        print(f"jaxllm: config error: {error}", file=sys.stderr)
        return 2
    return 0
