"""`star methods`: every method with its options (type, default, meaning), and which model family refuses which."""

from __future__ import annotations

import argparse
import dataclasses

from star.adapters import ADAPTERS
from star.adapters.base import vision_refusal
from star.cli.args import command
from star.methods import REGISTRY

SUPPORTED = [adapter for adapter in ADAPTERS if adapter.model_classes]  # the families this transformers line has (not Gemma 4 or Qwen3.5 on 4.57)


def add(commands: argparse._SubParsersAction) -> None:
    sub = command(
        commands, "methods", help="list the pruning methods and their options",
        description="Lists each pruning method with its source, its position policy and its options (type, default, "
        "meaning), the model families that refuse it and why, and what an int --keep counts in each family.",
        examples=["star methods"],
    )
    sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    rows = [(f.name, f"{f.type} = {f.default!r}", f.metadata["help"]) for cls in REGISTRY.values() for f in dataclasses.fields(cls)]
    name_width, type_width = (max(len(row[i]) for row in rows) for i in (0, 1))
    for name, cls in REGISTRY.items():
        print(f"{name:11s} {cls.summary}")
        print(f"{'':13s} defaults from {cls.source}; positions={cls.positions!r}")
        for f in dataclasses.fields(cls):
            print(f"{'':13s} {f.name:{name_width}s}  {f'{f.type} = {f.default!r}':{type_width}s}  {f.metadata['help']}")
        if not dataclasses.fields(cls):
            print(f"{'':13s} no options")
        for adapter in SUPPORTED:
            reason = vision_refusal(adapter, cls())
            if reason:
                models = ", ".join(model.__name__ for model in adapter.model_classes)
                print(f"{'':13s} refused by {models}: {reason}")
    print("Model families, what an int --keep counts in each, and the methods that run on it:")
    for adapter in SUPPORTED:
        refused = [name for name, cls in REGISTRY.items() if vision_refusal(adapter, cls())]
        runs = "every method" if not refused else f"every method but {', '.join(refused)}"
        print(f"  {', '.join(c.__name__ for c in adapter.model_classes)}: {adapter.budget_note}; {runs}")
    print("Set an option with --option NAME=VALUE (a tuple as 8/16/24) in run, eval, bench, demo and flops; sweep one with eval's --grid NAME=V1,V2.")
