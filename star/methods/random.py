"""Random patches, seeded: the floor any attention-guided method has to beat.

The subset depends on the seed alone, not on an image's place in a batch, so a batch gives what each prompt
gives alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from star.methods.base import Method, Plan, Selection, VisionView


@dataclass(frozen=True)
class RandomPruning(Method):
    name = "random"
    summary = "a seeded random subset of the patches, before the decoder"

    seed: int = field(default=0, metadata={"help": "the seed of the random subset"})

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        return Plan(n_visual=n_visual, vision_keep=keep)

    def select_vision(self, view: VisionView, k: int) -> Selection:
        images, n = view.features.shape[:2]
        generator = torch.Generator().manual_seed(self.seed)
        subset = torch.randperm(n, generator=generator)[:k].sort().values.to(view.features.device)
        return Selection(subset.expand(images, k))
