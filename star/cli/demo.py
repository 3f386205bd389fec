"""`star demo`: the default model answers a few questions with and without a method, and draws what it kept."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import star
from star.cli.args import add_model_options, add_option_argument, budget, check, command, label, load, method_name, out_dir, settings
from star.cli.run import save_viz

DEMO_PHOTOS = [
    ("astronaut.jpg", "What is the person holding?"),
    ("coffee.jpg", "What color is the cup?"),
]
REPEATS = 3  # prefills timed per image and setting after an untimed one; the table shows their median


def add(commands: argparse._SubParsersAction) -> None:
    sub = command(
        commands, "demo",
        help="the main job: the default model answers questions with and without STAR, and draws what it kept",
        description="Builds (or reuses) the default model, answers a few questions about generated scenes and "
        "bundled photographs without pruning and with STAR, prints a table (answers, tokens kept, FLOPs saved, "
        f"prefill time: the median of {REPEATS} prefills of each setting after a warm-up one, unpruned > pruned), and "
        "writes the paper's Figure 4 for each image into OUT. For timings worth quoting (batches, decode speed, memory, "
        "the oracle) use star bench.",
        examples=["star demo", "star demo --method fastervlm --keep 39 --out demo-fastervlm"],
    )
    add_model_options(sub)
    sub.add_argument("--method", type=method_name, default="star", help="the pruning method to show (default star)")
    sub.add_argument("--keep", type=budget, default=20, help="visual tokens kept per image (default 20 of 196)")
    add_option_argument(sub)
    sub.add_argument("--out", type=out_dir, default="star-demo", help="where the pictures go (default ./star-demo)")
    sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from importlib.resources import files

    from star.eval.records import Record
    from star.eval.runner import answer_batch, build_prompt
    from star.eval.sources import load_records

    [setting] = settings([args.method], [args.keep], args.option)
    check(args, [setting])
    scenes = load_records("scenes", "test", 1)[0]
    assets = files("star") / "data" / "assets"
    photos = [Record(name.split(".")[0], Path(str(assets / name)), question, "") for name, question in DEMO_PHOTOS]
    model, processor = load(args)
    args.out.mkdir(parents=True, exist_ok=True)
    unpruned = dict(method="none", keep=1.0)
    pruning = dict(method=setting.method, keep=setting.keep, positions=args.positions, **setting.options)
    print(f"| image | question | truth | unpruned | {label(setting)} | tokens | FLOPs saved | prefill ms (median of {REPEATS}) |")
    print("|---|---|---|---|---|---|---|---|")
    for record in scenes + photos:
        with star.apply(model, **unpruned) as pruner:
            [full], _ = answer_batch(model, processor, [record])
            full_flops = pruner.stats.flops
        with star.apply(model, **pruning) as pruner:
            [pruned], _ = answer_batch(model, processor, [record])
            stats = pruner.stats
        inputs = processor(images=[record.open_image()], text=[build_prompt(processor, record.question)], return_tensors="pt")
        full_s, pruned_s = prefill_times(model, inputs.to(model.device), [unpruned, pruning])
        tokens = " > ".join(str(t) for t in stats.tokens)
        print(
            f"| {record.id} | {record.question} | {record.answer} | {full} | {pruned} | {tokens} | "
            f"{1 - stats.flops / full_flops:.0%} | {full_s * 1e3:.0f} > {pruned_s * 1e3:.0f} |"
        )
        save_viz(processor, record, stats, args.out / f"{record.id}.png", f"{label(setting)}: {record.question} -> {pruned}")
    print(f"prefill ms: unpruned > pruned, each the median of {REPEATS} forward passes after an untimed one, on this machine "
          "as loaded now; star bench measures speed (batches, decode, memory, the oracle)")
    print(f"wrote the kept-token pictures to {args.out}/")


@torch.no_grad()
def prefill_times(model, inputs: dict, pruning: list[dict], repeats: int = REPEATS) -> list[float]:
    """The median seconds of `repeats` prefills (one forward call on the prompt) under each of `pruning`
    (star.apply's arguments), after an untimed one of each: a first call pays one-time costs that once showed as
    8 s against 1 s. The settings alternate call by call, so a machine that slows down moves them alike."""
    times = [[] for _ in pruning]
    for call in range(1 + repeats):
        for kwargs, row in zip(pruning, times):
            with star.apply(model, **kwargs):
                start = time.perf_counter()
                model(**inputs)
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                elapsed = time.perf_counter() - start
            if call > 0:
                row.append(elapsed)
    return [statistics.median(row) for row in times]
