"""Bridges to the evaluation tools researchers already use; each needs its own optional extra (e.g. `star-vlm[lmms]`)."""

from __future__ import annotations

import argparse

from star.families import listed

LMMS_MISSING = (
    "lmms-eval is not installed: pip install 'star-vlm[lmms]' (with a CPU-only torch, where lmms-eval's "
    "torchvision dependency would replace it: pip install --no-deps lmms-eval==0.7.3 && pip install 'star-vlm[lmms-core]')"
)


def add_lmms_eval_command(commands: argparse._SubParsersAction) -> None:
    """`star lmms-eval ARGS`: every argument, options included, goes unchanged to lmms-eval's command line."""
    sub = commands.add_parser(
        "lmms-eval",
        help="lmms-eval's command line with the star backend registered (--model star is the default); "
        f"model_args pretrained= a checkpoint of {listed()}",
        prefix_chars="+",  # no option of ours: '--tasks', '-h' and the rest are lmms-eval's
        add_help=False,
    )
    sub.add_argument("args", nargs="*")
    sub.set_defaults(run=_run_lmms_eval)


def _run_lmms_eval(args: argparse.Namespace) -> int:
    try:
        from star.integrations.lmms_eval import main
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "lmms_eval":
            raise ValueError(LMMS_MISSING) from error
        raise
    return main(args.args)
