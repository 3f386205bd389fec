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
    head = ["method", *(["options"] * swept), "keep", "n", "accuracy", *types, "retention", "tokens per stage", "TFLOPs", "prefill ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per_type = [_pct(r["per_type"][t]["accuracy"]) if t in r["per_type"] else "" for t in types]
        cells = [
            r["method"],
            *([_options(r)] * swept),
            str(r["keep"]),
            str(r["n"]),
            _pct(r["accuracy"]),
            *per_type,
            _pct(r["retention"]),
            " / ".join(f"{t:.0f}" for t in r["tokens"]),
            f"{r['flops'] / 1e12:.4f}" if r["flops"] is not None else "",
            f"{r['prefill_s'] * 1e3:.0f}" if r["prefill_s"] is not None else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    majority = {t: v["majority"] for r in rows for t, v in r["per_type"].items()}
    if majority:
        levels = ", ".join(f"{t} {_pct(level)}" for t, level in sorted(majority.items()))
        lines.append(f"\nMajority-answer level (always giving a type's most common answer): {levels}.")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str = "") -> None:
    """Accuracy against prefill FLOPs (left) and against remaining visual tokens (right), a line per method."""
    rows = [r for r in summary["settings"] if r["accuracy"] is not None]
    fig, (by_flops, by_tokens) = plt.subplots(1, 2, figsize=(11, 4.2))
    for line in dict.fromkeys(_label(r) for r in rows):  # a line per method and options, across budgets
        mine = sorted((r for r in rows if _label(r) == line), key=lambda r: r["flops"])
        style = {"marker": "o", "label": line, "linestyle": "none" if line == "none" else "-"}
        by_flops.plot([r["flops"] / 1e12 for r in mine], [100 * r["accuracy"] for r in mine], **style)
        by_tokens.plot([r["tokens"][-1] for r in mine], [100 * r["accuracy"] for r in mine], **style)
    by_flops.set_xlabel("decoder prefill TFLOPs per prompt")
    by_tokens.set_xlabel("visual tokens left per image")
    by_tokens.set_xscale("log")
    for axis in (by_flops, by_tokens):
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
    by_tokens.legend(fontsize=8)
    n = max((r["n"] for r in rows), default=0)
    fig.suptitle(f"{title} (n = {n} questions per setting)".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _options(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(row.get("options", {}).items()))


def _label(row: dict) -> str:
    return f"{row['method']} {_options(row)}".strip()


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"
