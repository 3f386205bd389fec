"""`star eval`: every method at every budget on a question set, as a table and plots; resumable."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from star.cli.args import (
    add_model_options, add_option_argument, budget, check, command, csv, data, fraction, keeps_or_flops, list_of, load,
    model_path, out_dir, positive, setting_names, settings, split, sweep, time_fraction,
)


def add(commands: argparse._SubParsersAction) -> None:
    sub = command(
        commands, "eval",
        help="accuracy of every method at every budget, with FLOPs and time, as a table and plots",
        description="Answers every question under every method and budget (greedy, normalised exact match) and "
        "writes OUT/results.json, OUT/results.md and OUT/accuracy.png (accuracy against FLOPs and against "
        "tokens). Answers are appended to OUT/runs/ as they come, so an interrupted run resumes where it "
        "stopped. Unreadable records are skipped and listed at the end.",
        examples=["star eval --data scenes --methods none,star,fastv,fastervlm --keep 98,39,20,10 --limit 50 --out results/",
                  "star eval --data scenes --methods none,star,fastervlm --flops 0.2,0.3,0.5 --out at-equal-flops/",
                  "star eval --data scenes --methods star,pool --time 0.3,0.5 --schedules schedules/ --out at-equal-time/",
                  "star eval --data scenes --split validation --methods star --keep 20 --grid layer=4,8,15",
                  "star eval --model OpenGVLab/InternVL3-8B-hf --device cuda --dtype bfloat16 --data scenes --methods none,star --keep 64"],
    )
    add_model_options(sub)
    sub.add_argument("--data", type=data, default="scenes", help="scenes, easy-vqa, or a JSONL file of {image, question, answer[, type]}")
    sub.add_argument("--split", help="split of scenes / easy-vqa: train, validation (scenes only) or test (default test)")
    sub.add_argument(
        "--methods", type=setting_names, default="none,star,fastv,fastervlm,visionzip,pdrop,sparsevlm,random",
        help="comma-separated methods, and resize (the image made smaller before the processor, Qwen families: star.resize)"
    )
    sub.add_argument("--keep", type=list_of(budget, "budget", "98,39,20,10"), help="comma-separated budgets (ints, or fractions in (0, 1]; default 98,39,20,10)")
    sub.add_argument(
        "--flops", type=list_of(fraction, "fraction", "0.2,0.3,0.5"), metavar="F1,F2",
        help="compute budgets instead of --keep: fractions of the unpruned prefill FLOPs, each picking every method's "
        "keep (and STAR's layer and stage-1 ratio) from its schedule or the FLOPs formula, as apply(flops=) does",
    )
    sub.add_argument(
        "--time", type=list_of(time_fraction, "fraction", "0.3,0.5"), metavar="T1,T2",
        help="time budgets instead of --keep: fractions of the unpruned prefill time, each picking every method's setting "
        "from its schedule with measured times (--schedules), as apply(time=) does",
    )
    sub.add_argument(
        "--schedules", type=Path, metavar="FOLDER",
        help="with --time: FOLDER/METHOD.json for every method, each written by `star calibrate --method METHOD` on this machine",
    )
    add_option_argument(sub)
    sub.add_argument("--limit", type=positive, help="at most this many questions (scenes: per question type)")
    sub.add_argument("--types", help="comma-separated question types to keep (e.g. color,shape for easy-VQA); --limit then counts per type")
    sub.add_argument(
        "--grid", action="append", type=sweep, default=[], metavar="OPTION=V1,V2",
        help="sweep a method option (e.g. layer=4,8,15 or stage1_ratio=0,0.15 or positions=original,contiguous) "
        "for every pruning method; repeat for a grid over several options",
    )
    sub.add_argument("--batch-size", type=positive, default=8)
    sub.add_argument("--max-new-tokens", type=positive, default=8, help="answer length limit (default 8)")
    sub.add_argument("--out", type=out_dir, default="star-eval", help="output directory (default ./star-eval)")
    sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from star.eval import report
    from star.eval.runner import check_identity, evaluate, model_identity
    from star.eval.sources import load_records

    chosen = split(args.data, args.split)
    keeps, flops = keeps_or_flops(args.keep, args.flops, [98, 39, 20, 10], args.time)
    swept = settings(args.methods, keeps, args.option, args.grid, flops, args.time or [], args.schedules)
    check(args, swept)
    records, skipped = load_records(args.data, chosen, args.limit, csv(args.types) if args.types else None)
    identity = {**model_identity(model_path(args)), "dtype": args.dtype, "positions": args.positions,
                "max_new_tokens": args.max_new_tokens}
    check_identity(args.out, identity, write=int(os.environ.get("RANK", 0)) == 0)
    model, processor = load(args)
    summary, failed = evaluate(
        model, processor, records, swept, args.out, args.batch_size, args.max_new_tokens, positions=args.positions
    )
    if summary is None:  # a data-parallel process other than rank 0: its answers are on disk
        return
    table = report.markdown_table(summary)
    (args.out / "results.md").write_text(table)
    report.plot(summary, args.out / "accuracy.png", title=f"{args.data} ({chosen})")
    print(table)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'accuracy.png'}")
    for message in skipped + failed:
        print(f"skipped: {message}", file=sys.stderr)
