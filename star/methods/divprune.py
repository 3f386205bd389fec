"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse visual tokens, a max-min diversity problem solved
greedily, before the decoder. No attention: it works with any encoder and attention kernel.

Following vbdi/divprune at 799e2d9 (`LLaVA/llava/model/llava_arch.py`, `DivPrune`): the distance of two visual
tokens is 1 - the cosine similarity of their decoder input embeddings (the projected features). The first
token kept is the one farthest from its nearest other token; each next one is the token whose distance to
the nearest kept token is largest (ties to the lower index). The kept tokens enter the decoder in spatial
order. The code's budget is a ratio of the image's tokens (`SUBSET_RATIO`); here it is `keep`.

Where this file departs from the code:
- The code finds the image by a hard-coded offset (35) in a batch of one prompt; here the adapter gives
  each image (each crop) of every prompt.
- LLaVA-NeXT: the code selects over the whole image's tokens at once, newline tokens included; here every
  crop keeps `keep` of its own tokens (the budget unit of every method) and the newline tokens stay.
- Distances are computed in float32, and a kept token is never picked again (the code can pick one twice
  once every token left duplicates a kept one, its distance to itself being a rounding error above 0).
- Positions: the code hands the decoder the shorter sequence, numbered without gaps, so
  positions="contiguous" is the default here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from star.methods.base import Method, Plan, Selection, VisionView
from star.scoring import flagged_in_order


@dataclass(frozen=True)
class DivPrune(Method):
    name = "divprune"
    summary = "the most diverse tokens (greedy max-min cosine distance of their embeddings), before the decoder"
    source = "vbdi/divprune @ 799e2d9"
    positions = "contiguous"

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        return Plan(n_visual=n_visual, vision_keep=keep)

    def select_vision(self, view: VisionView, k: int) -> Selection:
        return Selection(max_min_diverse(view.embeddings, k))


def max_min_diverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity over cosine distance: [I, N, D] tokens -> [I, k] indices in ascending order."""
    normed = torch.nn.functional.normalize(x.float(), dim=-1)
    distance = 1.0 - normed @ normed.transpose(1, 2)
    images = torch.arange(x.shape[0], device=x.device)
    # The first pick: the largest distance to the nearest other token (the second smallest of each column,
    # the smallest being the token's distance to itself).
    nearest = distance.topk(2, dim=1, largest=False).values[:, 1]
    taken = torch.zeros(distance.shape[:2], dtype=torch.bool, device=x.device)
    for step in range(k):
        pick = nearest.argmax(dim=-1)
        taken[images, pick] = True
        to_kept = distance[images, pick]
        nearest = (to_kept if step == 0 else torch.minimum(nearest, to_kept)).masked_fill(taken, float("-inf"))
    return flagged_in_order(taken, k)
