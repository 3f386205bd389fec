"""Draw the learning curve of the default model from its training log (loss per step, validation accuracy).

    .venv/bin/python scripts/plot_training.py docs/training/log.jsonl docs/training/curve.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(log: Path, out: Path) -> None:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if r.get("eval") == "validation"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    left.set(xlabel="step", ylabel="training loss (answer and caption tokens)", title="loss")
    located = [r for r in steps if r.get("position_loss")]
    if located:
        twin = left.twinx()
        twin.plot([r["step"] for r in located], [r["position_loss"] for r in located], lw=0.8, color="tab:orange")
        twin.set_ylabel("patch row + column loss (orange)")
    kinds = sorted({k for r in evals for k in r["scenes"]})
    for kind in kinds:
        left_pts = [(r["step"], r["scenes"][kind]["accuracy"]) for r in evals if kind in r["scenes"]]
        right.plot(*zip(*left_pts), marker="o", label=f"scenes {kind}")
    for kind in ("color", "shape"):
        pts = [(r["step"], r["easy-vqa"][kind]["accuracy"]) for r in evals if kind in r.get("easy-vqa", {})]
        if pts:
            right.plot(*zip(*pts), marker="s", ls="--", label=f"easy-VQA {kind}")
    if evals:
        n = evals[-1]["scenes"][kinds[0]]["n"]
        right.set_title(f"validation accuracy ({n} questions per type)")
    right.set(xlabel="step", ylabel="exact match", ylim=(0, 1))
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: plot_training.py LOG.jsonl OUT.png")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
