"""`star calibrate`: a method's accuracy-versus-compute frontier on validation data, as a schedule for apply(flops=)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from star.cli.args import (
    add_model_options, budget, command, csv, data, list_of, load, method_name, model_path, new_file, positive, split, sweep,
)
from star.methods import parse_option


def add(commands: argparse._SubParsersAction) -> None:
    sub = command(
        commands, "calibrate",
        help="measure a method's accuracy-versus-compute frontier on your data, for apply(..., flops=)",
        description="Sweeps a method's budget (--keep) and options (--grid; for star by default stage1_ratio=0,0.3,0.5 "
        "and layer at a sixteenth, an eighth, a quarter and half of the decoder's depth) on validation data, as star eval "
        "answers it (resumable: answers go to OUT's folder OUT-runs/), and writes OUT, a schedule of every "
        "setting's accuracy, FLOPs and prefill time (fractions of the unpruned model's, in the same run), and "
        "OUT's picture (.png) with the frontier. star.apply(model, flops=0.3, schedule=OUT) then picks the most "
        "accurate setting within that budget.",
        examples=["star calibrate --data scenes --split validation --limit 25 --out schedule.json",
                  "star calibrate --method fastv --keep 0.5,0.2,0.1 --grid layer=2,4 --limit 25 --out fastv.json"],
    )
    add_model_options(sub)
    sub.add_argument("--data", type=data, default="scenes", help="scenes, easy-vqa, or a JSONL file of {image, question, answer[, type]}")
    sub.add_argument("--split", help="split of scenes / easy-vqa (default: validation for scenes, train for easy-vqa, which has no validation split): never the split you report")
    sub.add_argument("--method", type=method_name, default="star", help="the method to calibrate (default star)")
    sub.add_argument("--keep", type=list_of(budget, "budget", "98,39,20,10"), default="0.5,0.2,0.1,0.05", help="comma-separated budgets to sweep (default 0.5,0.2,0.1,0.05 of the visual tokens)")
    sub.add_argument("--grid", action="append", type=sweep, default=[], metavar="OPTION=V1,V2", help="an option to sweep (repeat for a grid); replaces the default grid")
    sub.add_argument("--limit", type=positive, help="at most this many questions (scenes: per question type)")
    sub.add_argument("--types", help="comma-separated question types to keep; --limit then counts per type")
    sub.add_argument("--batch-size", type=positive, default=8)
    sub.add_argument("--max-new-tokens", type=positive, default=8, help="answer length limit (default 8)")
    sub.add_argument("--out", type=new_file, required=True, help="the schedule file to write, e.g. schedule.json")
    sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from star import checks
    from star.calibrate import calibrate, default_grid, grid_settings, runs_folder, schedule_unit
    from star.schedule import frontier
    from star.eval.runner import check_identity, model_identity
    from star.eval.sources import load_records

    if args.method == "none":
        raise ValueError("--method 'none' has nothing to calibrate: name a pruning method")
    chosen = split(args.data, args.split or {"scenes": "validation", "easy-vqa": "train"}.get(args.data))
    checks.check_device(args.device)
    skeleton = checks.model_skeleton(args.model)
    schedule_unit(skeleton)
    if args.grid:
        grid = {name: [parse_option(args.method, name, value) for value in values] for name, values in args.grid}
    else:
        grid = default_grid(args.method, skeleton.config.get_text_config().num_hidden_layers)
    for setting in grid_settings(args.method, args.keep, grid):
        checks.check_setting(skeleton, setting.method, setting.keep, setting.options, args.positions)
    records, skipped = load_records(args.data, chosen, args.limit, csv(args.types) if args.types else None)
    identity = {**model_identity(model_path(args)), "dtype": args.dtype, "positions": args.positions, "max_new_tokens": args.max_new_tokens}
    check_identity(runs_folder(args.out), identity)
    model, processor = load(args)
    source = f"star calibrate on {Path(args.data).name} ({chosen}), {len(records)} questions"
    schedule, failed = calibrate(
        model, processor, records, args.method, args.keep, grid, args.out, source, args.batch_size, args.max_new_tokens, args.positions
    )
    print("The frontier (each setting more accurate than every cheaper one), by FLOPs:")
    print("| FLOPs | time | keep | options | accuracy (95% CI) | n |\n|---|---|---|---|---|---|")
    for point in frontier(list(schedule.points), "flops"):
        options = " ".join(f"{k}={v}" for k, v in sorted(point.options.items()))
        low, high = point.interval
        print(f"| {point.flops:.3f} | {point.time:.3f} | {point.keep} | {options} | {100 * point.accuracy:.1f} ({100 * low:.1f}-{100 * high:.1f}) | {point.n} |")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}; answers in {runs_folder(args.out)}/ (a rerun resumes)")
    for message in skipped + failed:
        print(f"skipped: {message}", file=sys.stderr)
