"""What the subcommands share: their parser pieces, the argument types, the checks that run on the parsed
arguments before any compute, and the model they name.

An argument type runs while argparse parses, so a malformed value is a usage error that names the argument;
the checks that need several arguments or the model's config raise a ValueError, which `main` prints as one
`star CMD: error: ...` line.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

from star.families import listed
from star.methods import REGISTRY, options, parse_option
from star.pruner import POSITION_POLICIES


class HelpFormatter(argparse.HelpFormatter):
    """Wraps the description without breaking an option or a path at its hyphens, and keeps the indented lines of
    the examples as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if line.startswith(" "):  # an example
                lines.append(indent + line)
            else:
                lines.append(textwrap.fill(" ".join(line.split()), width, initial_indent=indent, subsequent_indent=indent,
                                           break_on_hyphens=False))
        return "\n".join(lines)


def command(commands: argparse._SubParsersAction, name: str, help: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with examples to copy."""
    epilog = "examples:\n" + "\n".join(f"  {example}" for example in examples)
    return commands.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter)


def add_option_argument(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--option", action="append", type=option, default=[], metavar="NAME=VALUE",
        help="a method option, of the type `star methods` lists (e.g. layer=8, stage1_ratio=0.3, layers=8/16/24), "
        "for every method given but none; repeat for several",
    )


def add_model_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", help=f"a checkpoint directory or hub id of a supported family: {listed()} (default: the project's default model)")
    sub.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps (default cpu)")
    sub.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights dtype")
    sub.add_argument(
        "--positions", default=None, choices=POSITION_POLICIES,
        help="rotary positions of kept tokens (default: each method's authors' policy, as `star methods` lists)",
    )


# Argument types.


def budget(text: str) -> int | float:
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


def share_of(name: str, of: str):
    """The argument type of a budget `name` given as a fraction of the unpruned prefill's `of` (FLOPs, time)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"{name}={text!r} is not a budget: give a fraction of the unpruned prefill {of} in (0, 1]")
        return value

    return parse


fraction = share_of("flops", "FLOPs")
time_fraction = share_of("time", "time")


def list_of(parse, what: str, example: str):
    """The argument type of a comma-separated list of `parse`'s values, at least one."""

    def parse_list(text: str) -> list:
        values = csv(text, parse)
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} holds no {what}: give comma-separated {what}s, e.g. {example}")
        return values

    return parse_list


def method_name(text: str) -> str:
    try:
        options(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def method_names(text: str) -> list[str]:
    names = csv(text, method_name)
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} holds no method: known methods are {', '.join(REGISTRY)}")
    return names


def setting_names(text: str) -> list[str]:
    """--methods of eval and bench: method names, and `resize` beside them (a smaller image, star.resize: not a
    method, a preprocessing option)."""
    from star.resize import NAME

    def known(name: str) -> str:
        try:
            return name if name == NAME else method_name(name)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{error}, and {NAME} (a smaller image)") from None

    names = csv(text, known)
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} holds no method: known methods are {', '.join(REGISTRY)}, and {NAME}")
    return names


def option(text: str) -> tuple[str, str]:
    """NAME=VALUE, as text: the value is typed per method, by its field, once the methods are known."""
    name, equals, value = (part.strip() for part in text.partition("="))
    if not (name and equals and value):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. layer=8)")
    return name, value


def sweep(text: str) -> tuple[str, list[str]]:
    name, equals, values = (part.strip() for part in text.partition("="))
    if not (name and equals and csv(values)):
        raise argparse.ArgumentTypeError(f"{text!r} is not OPTION=V1,V2 (e.g. layer=4,8,15)")
    return name, csv(values)


def positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive int")
    return int(text)


def count(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 0")
    return int(text)


def image(text: str) -> Path:
    from PIL import Image

    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    try:
        with Image.open(path) as opened:
            opened.verify()
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be read as an image ({error})") from None
    return path


def data(text: str) -> str:
    from star.eval.sources import BUILT_IN

    if text not in BUILT_IN and not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is neither {' nor '.join(BUILT_IN)} nor a file")
    return text


def new_file(text: str) -> Path:
    """A file to write at the end: its folder must exist now, not after the compute."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: there is no folder {str(path.parent)!r}")
    return path


def out_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return path


def csv(text: str, cast=str) -> list:
    return [cast(part.strip()) for part in text.split(",") if part.strip()]


# Checks on the parsed arguments, before any load.


def settings(methods: list[str], keeps: list[int | float], given: list[tuple[str, str]], grid: list[tuple[str, list[str]]] = (),
             flops: list[float] = (), times: list[float] = (), schedules: Path | None = None) -> list:
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
    result = [Setting("none", 1.0)] if "none" in methods else []
    for method in pruning:
        if method == "resize":  # a smaller image at each keep: no options, and no FLOPs budget (its images differ in size)
            if flops or times:
                given_budget = "--flops" if flops else "--time"
                raise ValueError(f"{given_budget} is given with resize: resize takes --keep only (tokens per image, or a fraction of its own)")
            result += [Setting(method, keep) for keep in keeps]
            continue
        points = [{name: text if name == "positions" else parse_option(method, name, text) for name, text in given}]
        for name, values in grid:
            typed = [value if name == "positions" else parse_option(method, name, value) for value in values]
            points = [{**point, name: value} for point in points for value in typed]
        result += [Setting(method, keep, point) for point in points for keep in keeps]
        result += [Setting(method, None, point, flops_budget=budget) for point in points for budget in flops]
        if times:
            schedule = schedule_of(schedules, method)
            result += [Setting(method, None, point, time_budget=budget, schedule=schedule) for point in points for budget in times]
    return result


def schedule_of(folder: Path | None, method: str) -> str:
    """--time's schedule for `method`: FOLDER/METHOD.json, which `star calibrate --method METHOD` writes, with times."""
    if folder is None:
        raise ValueError("--time needs --schedules FOLDER: each method's schedule with measured times, FOLDER/METHOD.json")
    path = folder / f"{method}.json"
    if not path.is_file():
        raise ValueError(
            f"--time needs {str(path)!r}, the schedule of {method} with measured times: run `star calibrate --method "
            f"{method} --out {path}` on this machine first"
        )
    return str(path)


def keeps_or_flops(keeps: list | None, flops: list | None, default: list, times: list | None = None) -> tuple[list, list]:
    """--keep, --flops or --time (one of them: each is a whole budget), the default keeps where none is given."""
    given = [name for name, value in (("--keep", keeps), ("--flops", flops), ("--time", times)) if value]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are both given: a budget is tokens, FLOPs or time, give one")
    return (keeps or ([] if flops or times else default)), (flops or [])


def check(args: argparse.Namespace, chosen: list) -> None:
    """The device, the model and every setting, checked on the model's skeleton before any load or download."""
    from star import checks
    from star.schedule import BudgetUnreachable

    checks.check_device(args.device)
    skeleton = checks.model_skeleton(args.model)
    for setting in chosen:
        if setting.method == "resize":
            checks.check_resize(skeleton, setting.keep)
            continue
        try:
            checks.check_setting(skeleton, setting.method, setting.keep, setting.options, args.positions, setting.flops_budget,
                                 setting.time_budget, setting.schedule)
        except BudgetUnreachable:  # whether it is depends on the data's prompt length: star eval skips and says so
            pass


def split(data: str, given: str | None) -> str:
    """--split checked against --data: the built-in sets have their own splits, a JSONL file has none."""
    from star.data import easyvqa, scenes

    allowed = {"scenes": list(scenes.SPLITS), "easy-vqa": list(easyvqa.SPLITS)}.get(data)
    if allowed is None and given is not None:
        raise ValueError(f"--split {given!r} is given with --data {data!r}: a JSONL file has no splits, only scenes and easy-vqa do")
    if allowed is not None and given is not None and given not in allowed:
        raise ValueError(f"--split {given!r} is not a split of {data}: allowed are {', '.join(allowed)}")
    return given or "test"


def label(setting) -> str:
    """A setting as the tables name it: `star keep=20 layer=8`."""
    budget = f"flops={setting.flops_budget}, picking" if setting.flops_budget is not None else ""
    budget = f"time={setting.time_budget}, picking" if getattr(setting, "time_budget", None) is not None else budget
    return " ".join([setting.method, *([budget] if budget else []), f"keep={setting.keep}", *(f"{k}={v}" for k, v in setting.options.items())])


# The model the arguments name.


def model_path(args: argparse.Namespace) -> str:
    """--model, or the default model's directory (built on first use)."""
    if args.model is None:
        from star.zoo import build_default_model

        args.model = str(build_default_model())
    return args.model


def load(args: argparse.Namespace):
    """The model and its processor (images and text: star.families), on --device in --dtype, the processor padding
    on the left for batches."""
    import torch

    from star.families import load_model, load_processor

    path = model_path(args)
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per data-parallel process
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    processor = load_processor(path)
    model = load_model(path, dtype, getattr(args, "attn", "sdpa"))
    processor.tokenizer.padding_side = "left"
    return model.to(args.device).eval(), processor
