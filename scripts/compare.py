"""Tables and plots of a `scripts/results.sh compare` folder: every setting that answered there, over the
questions all of them answered (so every row has the same n), with 95% Wilson intervals.

    python scripts/compare.py docs/results/compare-scenes "scenes (test)" [BEFORE/results.json]

Writes results.json, results.md (a grid of methods by budget first, then every setting in full) and
accuracy.png into the folder, and prints results.md. Settings come from each setting's setting.json (star
eval writes it, and packs it with the answers into answers.jsonl.gz), so the authors' defaults and this
project's earlier variants, evaluated by separate `star eval` calls into one folder, land in one table. A
variant row is named by its options, and `pairs` sets it beside the default row of the same method and
budget, with the figure of an earlier `star eval` folder (BEFORE, run before the fidelity fixes) where one
is given; `against_star` sets each STAR row beside the best other method at its keep and at no more FLOPs.
Both give the paired difference of the two settings on the questions they both answered, with its 95%
interval: a difference whose interval excludes 0 is one these questions tell apart, even where the two
accuracy intervals overlap.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from star.eval import report
from star.eval.answers import Answers, read
from star.eval.runner import Setting, summarize
from star.eval.stats import paired_difference


def load(done: Answers) -> tuple[list[Setting], set[str], list[str], dict[str, dict[str, bool]]]:
    """The settings a folder answered (`done`), the record ids every one of them answered, the names of the settings
    left out because a run stopped early in them (fewer than half the median setting's answers; the rest are
    compared on the questions all of them answered, so a round stopped part-way costs n, not settings), and
    each setting's answers (record id: correct) by setting name."""
    found, answers = [], {}
    for run, data in sorted(done.definitions.items()):
        setting = Setting(data["method"], data["keep"], data.get("options", {}), data.get("flops_budget"), data.get("time_budget"), data.get("schedule"))
        answers[setting.name] = {key: row["correct"] for key, row in done.rows.get(run, {}).items()}
        found.append((setting, set(answers[setting.name])))
    counts = sorted(len(ids) for _, ids in found)
    median = counts[len(counts) // 2] if counts else 0
    settings = [s for s, ids in found if 2 * len(ids) >= median and ids]
    left_out = [s.name for s, ids in found if 2 * len(ids) < median or not ids]
    common = set.intersection(*(ids for s, ids in found if s in settings)) if settings else set()
    order = {"none": 0, "star": 1, "random": 99}
    settings.sort(key=lambda s: (order.get(s.method, 2), s.method, bool(s.options), sorted(s.options.items()),
                                 -(s.flops_budget if s.flops_budget is not None else s.time_budget if s.time_budget is not None else s.keep)))
    return settings, common, left_out, answers


def overlap(a: list[float], b: list[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def budget(row: dict) -> int | float:
    """What a row's column is: its FLOPs or time budget where it has one (`star eval --flops`, `--time`), else its keep."""
    for kind in ("flops_budget", "time_budget"):
        if row.get(kind) is not None:
            return row[kind]
    return row["keep"]


def budget_kind(rows: list[dict]) -> str:
    """What the rows' budgets are: flops or time where a row has such a budget, else keep."""
    return next((k for k in ("flops", "time") if any(r.get(f"{k}_budget") is not None for r in rows)), "keep")


def budget_name(value: int | float, rows: list[dict]) -> str:
    return f"{budget_kind(rows)} {value}"


def name(row: dict) -> str:
    return Setting(row["method"], row["keep"], row["options"], row.get("flops_budget"), row.get("time_budget"), row.get("schedule")).name


def grid(summary: dict) -> str:
    """Every method and variant as a row, every budget as a column: accuracy (95% interval) and TFLOPs, the
    table to read first."""
    rows = [r for r in summary["settings"] if r["accuracy"] is not None]
    keeps = sorted({budget(r) for r in rows if r["method"] != "none"}, reverse=True)
    lines = ["| method | options | " + " | ".join(budget_name(k, rows) for k in keeps) + " |", "|---|---|" + "---|" * len(keeps)]
    for label in dict.fromkeys(report._label(r) for r in rows):
        mine = {budget(r): r for r in rows if report._label(r) == label}
        first = next(iter(mine.values()))
        if first["method"] == "none":
            mine = dict.fromkeys(keeps, first)
        cells = [f"{report._with_interval(mine[k])} [{cost(mine[k])}]" if k in mine else "" for k in keeps]
        lines.append(f"| {first['method']} | {report._options(first)} | " + " | ".join(cells) + " |")
    kind = budget_kind(rows)
    note = "decoder prefill TFLOPs per prompt" + (f"; the keep a {'FLOPs' if kind == 'flops' else kind} budget picked" if kind != "keep" else "")
    return "\n".join(lines) + f"\n\nAccuracy in % (95% Wilson interval) [{note}]; `none` is unpruned, repeated.\n"


def cost(row: dict) -> str:
    picked = (row.get("picked") or {}).get("keep")
    return f"{row['flops'] / 1e12:.4f}" + ("" if picked is None else f"; keep {picked}")


def difference(answers: dict[str, dict[str, bool]], first: dict, second: dict) -> str:
    """`first` minus `second` in points on the questions both answered, paired, with its 95% interval; bold
    where the interval excludes 0."""
    a, b = (answers[name(r)] for r in (first, second))
    shared = sorted(set(a) & set(b))
    value, (low, high) = paired_difference([a[k] for k in shared], [b[k] for k in shared])
    text = f"{100 * value:+.1f} ({100 * low:+.1f} to {100 * high:+.1f})"
    return f"**{text}**" if low > 0 or high < 0 else text


def pairs(summary: dict, answers: dict[str, dict[str, bool]], before: dict | None) -> str:
    """Each peer's authors' defaults beside this project's earlier variant (run here, on the same questions) and
    the earlier folder's figure for the same method and budget (other questions, its own n), per budget."""
    rows = summary["settings"]
    variants = {(r["method"], budget(r)): r for r in rows if r["options"]}
    earlier = {(r["method"], budget(r)): r for r in (before or {}).get("settings", []) if not r.get("options")}
    lines = [
        "| method | keep | authors' defaults | variant, same questions | overlap | variant - defaults, paired | before the fidelity fixes (earlier run, n) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        variant = variants.get((r["method"], budget(r)))
        if r["options"] or variant is None or r["interval"] is None or variant["interval"] is None:
            continue
        old = earlier.get((r["method"], budget(r)))
        old_text = "" if old is None else f"{100 * old['accuracy']:.1f} (n={old['n']})"
        lines.append(
            f"| {r['method']} | {budget(r)} | {report._with_interval(r)} | {report._with_interval(variant)} "
            f"({report._options(variant)}) | {'yes' if overlap(r['interval'], variant['interval']) else '**no**'} "
            f"| {difference(answers, variant, r)} | {old_text} |"
        )
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def star_against_each(summary: dict, answers: dict[str, dict[str, bool]]) -> str:
    """STAR minus every other setting at the same budget (keep or FLOPs), paired on the same questions, in points
    with the 95% interval; bold where the interval excludes 0 (STAR better if positive)."""
    rows = [r for r in summary["settings"] if r["accuracy"] is not None]
    star = {budget(r): r for r in rows if r["method"] == "star" and not r["options"]}
    keeps = sorted(star, reverse=True)
    lines = ["| STAR minus | options | " + " | ".join(budget_name(k, rows) for k in keeps) + " |", "|---|---|" + "---|" * len(keeps)]
    for label in dict.fromkeys(report._label(r) for r in rows if r["method"] not in ("none", "star")):
        mine = {budget(r): r for r in rows if report._label(r) == label}
        first = next(iter(mine.values()))
        cells = [difference(answers, star[k], mine[k]) if k in mine else "" for k in keeps]
        lines.append(f"| {first['method']} | {report._options(first)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def against_star(summary: dict, answers: dict[str, dict[str, bool]]) -> str:
    """Each STAR row beside the most accurate other method at the same budget, and at the same or lower FLOPs, with
    whether their 95% intervals overlap and STAR's paired difference from it."""
    rows = [r for r in summary["settings"] if r["accuracy"] is not None]
    peers = [r for r in rows if r["method"] not in ("none", "star")]
    lines = [
        "| STAR budget | STAR (TFLOPs) | best other at the same budget | overlap | STAR - it, paired "
        "| best other at no more FLOPs | overlap | STAR - it, paired |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for star in (r for r in rows if r["method"] == "star" and not r["options"]):
        same_keep = max((r for r in peers if budget(r) == budget(star)), key=lambda r: r["accuracy"], default=None)
        cheaper = max((r for r in peers if r["flops"] <= star["flops"]), key=lambda r: r["accuracy"], default=None)
        cells = [f"{budget(star)}", f"{report._with_interval(star)} ({cost(star)})"]
        for other in (same_keep, cheaper):
            if other is None:
                cells += ["none", "", ""]
                continue
            label = f"{other['method']} {report._options(other)} {budget_name(budget(other), rows)}".replace("  ", " ")
            overlapping = overlap(star["interval"], other["interval"])
            cells += [f"{label}: {report._with_interval(other)} ({cost(other)})", "yes" if overlapping else "**no**",
                      difference(answers, star, other)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(folder: str, title: str, before: str | None = None) -> None:
    out = Path(folder)
    done = read(out)
    settings, ids, left_out, answers = load(done)
    summary = summarize(settings, done, ids)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    earlier = json.loads(Path(before).read_text()) if before else None
    parts = [grid(summary), report.markdown_table(summary), pairs(summary, answers, earlier),
             star_against_each(summary, answers), against_star(summary, answers)]
    table = "\n".join(part for part in parts if part)
    if left_out:
        table += f"\nLeft out, answered only in part when the run stopped: {', '.join(left_out)}.\n"
    (out / "results.md").write_text(table)
    report.plot(summary, out / "accuracy.png", title=title)
    print(table)


if __name__ == "__main__":
    main(*sys.argv[1:4])
