"""The `star` command: one module per subcommand, each with `add(commands)` (its parser) and `run(args)`; what
they share is in `args`."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from star.cli import bench, calibrate, demo, flops, methods, model, run, serve
from star.cli import eval as evaluate  # `eval` is a builtin
from star.integrations import add_lmms_eval_command
from star.methods import REGISTRY

COMMANDS = [methods, flops, model, run, evaluate, calibrate, bench, demo, serve]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if hasattr(args, "passed_on"):  # star serve: what it does not know goes to vLLM unchanged
            args.passed_on = unknown
        elif unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}{_option_hint(unknown)}")
    except SystemExit as exit:  # a usage error (2) or --help (0), already printed
        return exit.code
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except ValueError as error:
        print(f"star {args.command}: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="star",
        description="STAR and its peers: training-free visual-token pruning for vision-language models.",
        epilog="`star COMMAND --help` explains a command, with examples.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add(commands)
    add_lmms_eval_command(commands)
    return parser


def _option_hint(unknown: list[str]) -> str:
    """For `--layer 8`, say that method options go through --option."""
    name, _, value = unknown[0].lstrip("-").replace("-", "_").partition("=")
    value = value or (unknown[1] if len(unknown) > 1 else "VALUE")
    known = {f.name for cls in REGISTRY.values() for f in dataclasses.fields(cls)}
    return f" (a method option is given as --option {name}={value})" if unknown[0].startswith("--") and name in known else ""
