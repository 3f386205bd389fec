"""Time reduction against FLOPs reduction, one point per (model shape, batch size, method, budget), from `star bench`
JSON files, with the diagonal (time falls exactly as FLOPs do) and the 0.9 line (the target for STAR's prefill).

    python scripts/plot_scaling.py docs/results/scale/*.json docs/results/table3/*.json --out docs/results/scale/scaling.png

FLOPs are PyTorch's count of the whole prefill (vision tower, projector, decoder, scoring): the work the measured
time covers. Filled markers are the method, hollow ones its oracle (the same kept tokens, no scoring).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"star": "o", "fastv": "s", "fastervlm": "^", "sparsevlm": "D", "pdrop": "v", "visionzip": "P", "random": "x"}


def points(rows: list[dict]) -> list[dict]:
    """Each pruned row as (FLOPs reduction, time reduction, oracle's time reduction), against its batch's unpruned row."""
    base = {(row["model"], row["device"], row["batch"]): row for row in rows if row["method"] == "none"}
    out = []
    for row in rows:
        reference = base.get((row["model"], row["device"], row["batch"]))
        if row["method"] == "none" or reference is None:
            continue
        flops = 1 - row["counted_flops"] / reference["counted_flops"]
        time = 1 - row["prefill_vs_unpruned"]
        oracle = 1 - row["prefill_vs_unpruned"] / row["prefill_vs_oracle"]
        out.append({**row, "flops_reduction": flops, "time_reduction": time, "oracle_reduction": oracle})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [{**row, "model": Path(row.get("model") or "default").name} for path in args.files for row in json.loads(path.read_text())]
    data = points(rows)
    shapes = sorted({(p["model"], p["device"]) for p in data})
    colors = {shape: plt.cm.tab10(i) for i, shape in enumerate(shapes)}
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, label="time falls as FLOPs (diagonal)")
    ax.plot([0, 1], [0, 0.9], color="grey", lw=1, ls="--", label="0.9 x FLOPs reduction")
    for p in data:
        color = colors[p["model"], p["device"]]
        size = 30 + 6 * p["batch"]
        marker = MARKERS.get(p["method"], "*")
        ax.scatter(p["flops_reduction"], p["time_reduction"], s=size, marker=marker, color=color, alpha=0.85)
        ax.scatter(p["flops_reduction"], p["oracle_reduction"], s=size, marker=marker, facecolors="none", edgecolors=color, alpha=0.6)
    for shape in shapes:
        ax.scatter([], [], color=colors[shape], label=f"{shape[0]} on {shape[1]}")
    for method in sorted({p["method"] for p in data}):
        ax.scatter([], [], color="black", marker=MARKERS.get(method, "*"), label=method)
    ax.set_xlabel("prefill FLOPs reduction (1 - pruned / unpruned, counted)")
    ax.set_ylabel("prefill time reduction (1 - pruned / unpruned)")
    ax.set_title("Does time fall as FLOPs do? (marker size: batch; hollow: oracle)")
    ax.set_xlim(0, 1)
    ax.set_ylim(min(-0.1, min((p["time_reduction"] for p in data), default=0)), 1)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} ({len(data)} points)")


if __name__ == "__main__":
    main()
