"""Reads back to the host in one prefill, every method against the unpruned model: docs/results.md's table.

    python scripts/host_syncs.py > docs/results/host-syncs.md

A tiny random LLaVA-1.5 of the real classes on the CPU (tests/conftest.py's), at a batch of one prompt and of three
prompts of different lengths; `star.bench.host_reads` counts what would each wait for the device on a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import batch, prompt_ids, tiny_llava  # noqa: E402

import star  # noqa: E402
from star.bench import host_reads  # noqa: E402


@torch.no_grad()
def main() -> None:
    model = tiny_llava()
    prompts = [prompt_ids(5, 7, 0), prompt_ids(2, 11, 1), prompt_ids(9, 3, 2)]
    batches = {"batch 1": batch(prompts[:1]), "batch 3": batch(prompts)}
    print("| method | " + " | ".join(f"{name}: reads (what)" for name in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for method in ["unpruned model (no pruner)", *star.methods()]:
        cells = []
        for inputs in batches.values():
            pruner = None if method.startswith("unpruned") else star.apply(model, method=method, keep=4 if method != "none" else 1.0)
            model(**inputs)
            reads = host_reads(lambda: model(**inputs))
            if pruner is not None:
                pruner.remove()
            what = ", ".join(f"{name.removeprefix('aten::')} {count}" for name, count in sorted(reads.items()))
            cells.append(f"{sum(reads.values())} ({what})")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
