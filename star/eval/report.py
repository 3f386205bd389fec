"""The results as a person reads them: a Markdown table and accuracy against FLOPs and against tokens."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def markdown_table(summary: dict) -> str:
    """One row per setting: accuracy overall and per type (with n), retention, tokens per stage, cost."""
    rows = summary["settings"]
    types = sorted({t for r in rows for t in r["per_type"]})
    swept = any(r.get("options") for r in rows)  # a --grid run: its rows differ by their options
    head = [
        "method", *(["options"] * swept), "keep", "n", "accuracy (95% CI)", *types, "retention", "tokens per stage",
        "layer average", "TFLOPs", "prefill ms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per_type = [_with_interval(r["per_type"][t]) if t in r["per_type"] else "" for t in types]
        cells = [
            r["method"],
            *([_options(r)] * swept),
            _keep(r),
            str(r["n"]),
            _with_interval(r),
            *per_type,
            _pct(r["retention"]),
            " / ".join(f"{t:.0f}" for t in r["tokens"]),
            "" if r.get("average_tokens") is None else f"{r['average_tokens']:.1f}",
            f"{r['flops'] / 1e12:.4f}" if r["flops"] is not None else "",
            f"{r['prefill_s'] * 1e3:.0f}" if r["prefill_s"] is not None else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    majority = {t: v["majority"] for r in rows for t, v in r["per_type"].items()}
    if majority:
        levels = ", ".join(f"{t} {_pct(level)}" for t, level in sorted(majority.items()))
        lines.append(f"\nMajority-answer level (always giving a type's most common answer): {levels}.")
    lines.append("Accuracies in %, with the 95% Wilson interval in brackets; the layer average is the visual tokens per image averaged over the decoder's layers.")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str = "") -> None:
    """Accuracy against prefill FLOPs (left) and against remaining visual tokens (right), a line per method and
    options, with the 95% interval of each accuracy as an error bar. A method keeps one colour; its variants
    (options) are dashed with hollow markers, STAR is black, thickest and on top, the unpruned model grey, and
    the legend sits below the panels so that twenty lines stay readable."""
    rows = [r for r in summary["settings"] if r["accuracy"] is not None]
    peers = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("none", "star")]
    # the palette's greys go: grey is the unpruned model's
    palette = [c for c in plt.get_cmap("tab10" if len(peers) <= 9 else "tab20").colors if len(set(c)) > 1]
    colours = {"none": "grey", "star": "black"} | {m: palette[i % len(palette)] for i, m in enumerate(peers)}
    fig, (by_flops, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.6))
    for line in dict.fromkeys(_label(r) for r in rows):  # a line per method and options, across budgets
        mine = sorted((r for r in rows if _label(r) == line), key=lambda r: r["flops"])
        colour = colours[mine[0]["method"]]
        variant, star = bool(mine[0]["options"]), mine[0]["method"] == "star"
        style = {
            "label": line, "color": colour, "marker": "*" if star else "o", "markersize": 9 if star else 5,
            "markerfacecolor": "white" if variant else colour, "linewidth": 2.4 if star else 1.2,
            "linestyle": "none" if line == "none" else "--" if variant else "-", "zorder": 3 if star else 2,
        }
        accuracy = [100 * r["accuracy"] for r in mine]
        errors = [[a - 100 * r["interval"][0] for a, r in zip(accuracy, mine)], [100 * r["interval"][1] - a for a, r in zip(accuracy, mine)]]
        bars = {"yerr": errors, "capsize": 2, "elinewidth": 0.7, "ecolor": colour}
        by_flops.errorbar([r["flops"] / 1e12 for r in mine], accuracy, **bars, **style)
        by_tokens.errorbar([r["tokens"][-1] for r in mine], accuracy, **bars, **style)
    by_flops.set_xlabel("decoder prefill TFLOPs per prompt")
    by_tokens.set_xlabel("visual tokens left per image")
    by_tokens.set_xscale("log")
    for axis in (by_flops, by_tokens):
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
    handles, labels = by_flops.get_legend_handles_labels()
    columns = min(4, max(1, len(labels)))
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    n = max((r["n"] for r in rows), default=0)
    fig.suptitle(f"{title} (n = {n} questions per setting; bars: 95% intervals)".strip())
    fig.tight_layout(rect=(0, 0.035 * (-(-len(labels) // columns) + 1), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _keep(row: dict) -> str:
    """The budget: keep, or a FLOPs or time budget with the keep and options it picked."""
    kind = "flops" if row.get("flops_budget") is not None else "time" if row.get("time_budget") is not None else None
    if kind is None:
        return str(row["keep"])
    picked = row.get("picked") or {}
    chosen = " ".join(f"{k}={v}" for k, v in sorted(picked.get("options", {}).items()) if v is not None)
    return f"{kind} {row[kind + '_budget']}: {picked.get('keep')} {chosen}".strip()


def _options(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(row.get("options", {}).items()))


def _label(row: dict) -> str:
    return f"{row['method']} {_options(row)}".strip()


def _with_interval(entry: dict) -> str:
    """An accuracy with its 95% interval, in %: '83.1 (77.4-87.6)'."""
    interval = entry.get("interval")
    if entry["accuracy"] is None or interval is None:
        return _pct(entry["accuracy"])
    return f"{_pct(entry['accuracy'])} ({_pct(interval[0])}-{_pct(interval[1])})"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"
