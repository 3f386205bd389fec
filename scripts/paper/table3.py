"""Table 3 of the paper beside ours: the paper's figures, ours from `star bench` rows (JSON), and their ratios.

    python scripts/paper/table3.py OUT/batch1.json [OUT/batches.json ...] > OUT/table3.md

The paper timed LLaVA-1.5-7B on one RTX 4090 at batch size 1 on MME; ours is the same architecture with random
weights (`star bench --config llava-1.5-7b --random-init`) on whatever GPU ran the script, a 336 px image and 79
text tokens. What compares: FLOPs (the same formula, so they should match), memory (weights and activations),
and time as a ratio to the unpruned model, since the GPUs differ. The paper's latency is a whole MME request
(prefill and a few decode steps); ours is the prefill alone, so absolute times do not compare, ratios do.
Rows at larger batch sizes have no paper figure: they answer whether time still follows FLOPs there.
"""

from __future__ import annotations

import json
import sys

# Table 3 of the paper: (visual tokens, method) -> (TFLOPs per image, GPU memory GiB, latency ms, throughput it/s).
PAPER = {
    (576, "none"): (8.99, 15.24, 135.58, 7.38),
    (288, "fastv"): (5.67, 13.79, 130.11, 7.69),
    (288, "fastervlm"): (5.04, 14.99, 103.35, 9.68),
    (288, "sparsevlm"): (5.10, 18.31, 142.74, 7.01),
    (288, "star"): (6.41, 14.47, 134.68, 7.42),
    (58, "fastv"): (5.67, 13.79, 129.92, 7.70),
    (58, "fastervlm"): (1.95, 15.04, 73.06, 13.69),
    (58, "sparsevlm"): (2.18, 18.28, 116.87, 8.56),
    (58, "star"): (4.82, 14.35, 123.89, 8.07),
    (29, "fastv"): (5.67, 13.79, 129.74, 7.71),
    (29, "fastervlm"): (1.56, 15.04, 69.16, 14.46),
    (29, "star"): (4.62, 14.52, 121.80, 8.21),
}


def paper_vs_ours(rows: list[dict]) -> str:
    """The paper's rows (batch 1) with ours beside them: value, ours / paper, and latency as a ratio to unpruned."""
    ours = {(_tokens(row), row["method"]): row for row in rows if row["batch"] == 1}
    base_paper = PAPER[576, "none"]
    lines = [
        "| tokens | method | TFLOPs/image paper | ours | ours / paper | GPU mem GiB paper | ours | ours / paper "
        "| latency ms paper | prefill ms ours | latency vs unpruned paper | prefill vs unpruned ours | prefill vs oracle ours "
        "| it/s paper | prompts/s ours (prefill) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (tokens, method), (tflops, memory, latency, rate) in PAPER.items():
        row = ours.get((tokens, method))
        if row is None:
            lines.append(f"| {tokens} | {method} | {tflops:.2f} | | | {memory:.2f} | | | {latency:.2f} | | "
                         f"{latency / base_paper[2]:.3f} | | | {rate:.2f} | |")
            continue
        our_tflops, our_memory = row["flops"] / 1e12, (row["peak_memory_bytes"] or 0) / 2**30
        lines.append(
            f"| {tokens} | {method} | {tflops:.2f} | {our_tflops:.2f} | {our_tflops / tflops:.3f} | {memory:.2f} | "
            f"{our_memory:.2f} | {our_memory / memory:.3f} | {latency:.2f} | {row['prefill_s'] * 1e3:.1f} | "
            f"{latency / base_paper[2]:.3f} | {row['prefill_vs_unpruned']:.3f} | {row['prefill_vs_oracle']:.3f} | "
            f"{rate:.2f} | {row['prefill_prompts_per_s']:.2f} |"
        )
    return "\n".join(lines)


def scaling(rows: list[dict]) -> str:
    """Every row: does prefill time fall as FLOPs fall? efficiency = (1 - time ratio) / (1 - FLOPs ratio)."""
    lines = [
        "| batch | method | keep | prefill ms | prompts/s | prefill vs unpruned | counted FLOPs vs unpruned | efficiency "
        "| prefill vs oracle | decode tok/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {row["batch"]: row for row in rows if row["method"] == "none"}
    for row in rows:
        flops = row["counted_flops"] / base[row["batch"]]["counted_flops"]
        efficiency = f"{(1 - row['prefill_vs_unpruned']) / (1 - flops):.2f}" if flops < 0.99 else ""
        lines.append(
            f"| {row['batch']} | {row['method']} | {row['keep']} | {row['prefill_s'] * 1e3:.1f} | "
            f"{row['prefill_prompts_per_s']:.2f} | {row['prefill_vs_unpruned']:.3f} | {flops:.3f} | {efficiency} | "
            f"{row['prefill_vs_oracle']:.3f} | {row['decode_tokens_per_s'] or float('nan'):.1f} | {(row['peak_memory_bytes'] or 0) / 2**30:.2f} |"
        )
    return "\n".join(lines)


def _tokens(row: dict) -> int:
    return 576 if row["method"] == "none" else int(row["keep"])


def main(paths: list[str]) -> None:
    rows = [row for path in paths for row in json.loads(open(path).read())]
    described = {(row["model"], row["device"], row["dtype"], row["attn"], row["weights"]) for row in rows}
    print(f"Ours: {'; '.join(', '.join(map(str, d)) for d in sorted(described))}. Random weights: answers are meaningless, times are real.\n")
    print("Paper (LLaVA-1.5-7B, one RTX 4090, batch 1, MME) beside ours (batch 1):\n")
    print(paper_vs_ours(rows))
    print("\nEvery batch size: prefill time against FLOPs (efficiency 1.0: time falls exactly as FLOPs do):\n")
    print(scaling(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
