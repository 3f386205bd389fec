"""`star run`: one question about one image, unpruned and pruned, with the tokens kept and the FLOPs saved."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import star
from star import checks
from star.cli.args import (
    add_model_options, add_option_argument, budget, check, command, fraction, image, keeps_or_flops, label, load,
    method_name, new_file, positive, settings,
)
from star.methods import REGISTRY


def add(commands: argparse._SubParsersAction) -> None:
    sub = command(
        commands, "run",
        help="answer one question about one image, with pruning, and draw the kept tokens",
        description="Answers QUESTION about IMAGE with the given method and budget, prints the tokens kept at "
        "each stage and the FLOPs saved, and with --save-viz writes the paper's Figure 4 for that image.",
        examples=['star run --image star/data/assets/coffee.jpg --question "What color is the cup?" --method star --keep 20 --save-viz out.png',
                  'star run --image star/data/assets/coffee.jpg --question "What color is the cup?" --flops 0.3',
                  'star run --model Qwen/Qwen2.5-VL-7B-Instruct --image star/data/assets/astronaut.jpg --question "What is it?" --keep 64'],
    )
    add_model_options(sub)
    sub.add_argument("--image", type=image, required=True, help="an image file")
    sub.add_argument("--question", required=True, help="the question")
    sub.add_argument("--method", type=method_name, default="star", help=f"one of {', '.join(REGISTRY)} (default star)")
    sub.add_argument("--keep", type=budget, help="visual tokens kept per image: an int, or a fraction in (0, 1] (default 20)")
    sub.add_argument("--flops", type=fraction, help="a compute budget instead of --keep: a fraction of the unpruned prefill FLOPs")
    add_option_argument(sub)
    sub.add_argument("--save-viz", type=new_file, help="write the kept-token picture (PNG) here (LLaVA-1.5 checkpoints)")
    sub.add_argument("--max-new-tokens", type=positive, default=16)
    sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from star.eval.records import Record
    from star.eval.runner import answer_batch, method_options, text_tokens

    keeps, flops = keeps_or_flops([args.keep] if args.keep else None, [args.flops] if args.flops else None, [20])
    [setting] = settings([args.method], keeps, args.option, (), flops)
    check(args, [setting])
    if args.save_viz:
        checks.check_viz(args.model)
    model, processor = load(args)
    record = Record("run", args.image, args.question, "")
    with star.apply(model, method="none", keep=1.0) as pruner:
        [baseline], baseline_s = answer_batch(model, processor, [record], args.max_new_tokens)
        unpruned_flops = pruner.stats.flops
    with star.apply(model, method=setting.method, **setting.budget(text_tokens(processor, [record])), positions=args.positions, **setting.options) as pruner:
        [answer], pruned_s = answer_batch(model, processor, [record], args.max_new_tokens)
        if setting.flops_budget is not None:  # name what the budget picked
            setting = dataclasses.replace(setting, keep=pruner.keep, options={**setting.options, **method_options(pruner.method)})
        stats = pruner.stats
    print(f"question: {args.question}")
    print(f"unpruned: {baseline}    ({baseline_s * 1e3:.0f} ms prefill)")
    print(f"{label(setting)}: {answer}    ({pruned_s * 1e3:.0f} ms prefill)")
    print(f"visual tokens per stage: {' -> '.join(str(t) for t in stats.tokens)}; decoder layers cut: {stats.layers or 'none'}")
    print(f"prefill FLOPs: {stats.flops / 1e9:.2f} G of {unpruned_flops / 1e9:.2f} G ({1 - stats.flops / unpruned_flops:.0%} saved)")
    if args.save_viz:
        save_viz(processor, record, stats, args.save_viz, f"{label(setting)}: {args.question} -> {answer}")
        print(f"wrote {args.save_viz}")


def save_viz(processor, record, stats, path: Path, title: str) -> None:
    """The paper's Figure 4 for one image: what the model sees, and the tokens each stage keeps."""
    from star import viz

    pixels = processor.image_processor(images=record.open_image(), return_tensors="pt")["pixel_values"][0]
    view = viz.model_view(pixels, processor.image_processor.image_mean, processor.image_processor.image_std)
    grid = int(round(stats.tokens[0] ** 0.5))
    names = ["into the decoder"] + [f"from decoder layer {layer}" for layer in stats.layers]
    stages = [(f"{name}: {len(kept[0])} tokens", kept[0]) for name, kept in zip(names, stats.kept_patches)]
    viz.save_figure(view, stages, grid, path, title=title)
