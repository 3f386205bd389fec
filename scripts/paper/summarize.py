"""One Markdown table from a paper script's output folder: scores per task, and the efficiency columns of
Table 3 (prefill FLOPs, peak GPU memory, latency, throughput) from the star backend's per-sample logs.

    python scripts/paper/summarize.py results/paper/table1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The score each table reports per task, as lmms-eval 0.7.3 names it (MME: perception + cognition, both shown).
SCORES = {
    "vqav2_val": "exact_match,none", "gqa": "exact_match,none", "vizwiz_vqa_val": "exact_match,none",
    "textvqa_val_ocr": "exact_match,none", "scienceqa_img": "exact_match,none",
    "mme": ("mme_perception_score,none", "mme_cognition_score,none"), "pope": "pope_f1_score,none",
}


def summarize(folder: Path) -> str:
    lines = ["| setting | " + " | ".join(SCORES) + " | TFLOPs (total) | TFLOPs/sample | peak GiB | latency ms | it/s |", "|---" * (len(SCORES) + 6) + "|"]
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        results: dict = {}
        for path in run.rglob("*_results.json"):
            results.update(json.loads(path.read_text())["results"])
        counts = [c for path in run.rglob("*_samples_*.jsonl") for line in path.read_text().splitlines() for c in json.loads(line).get("token_counts") or [] if c]
        cells = []
        for task, key in SCORES.items():
            row = results.get(task, {})
            if isinstance(key, tuple):
                parts = [row.get(k) for k in key]
                cells.append(f"{parts[0]:.1f} + {parts[1]:.1f}" if None not in parts else "")
            else:
                value = row.get(key)
                cells.append(f"{100 * value:.2f}" if isinstance(value, (int, float)) else "")
        flops = [c["prefill_flops"] for c in counts if "prefill_flops" in c]
        latency = [c["latency_s"] for c in counts if "latency_s" in c]
        peak = max((c.get("peak_memory_bytes", 0) for c in counts), default=0)
        eff = [f"{sum(flops) / 1e12:.2f}", f"{sum(flops) / len(flops) / 1e12:.3f}"] if flops else ["", ""]
        eff += [f"{peak / 2**30:.2f}" if peak else ""]
        eff += [f"{1e3 * sum(latency) / len(latency):.2f}", f"{len(latency) / sum(latency):.2f}"] if latency else ["", ""]
        lines.append(f"| {run.name} | " + " | ".join(cells + eff) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        raise SystemExit("usage: summarize.py OUTPUT_FOLDER (a folder a scripts/paper/table*.sh run wrote)")
    print(summarize(Path(sys.argv[1])))
