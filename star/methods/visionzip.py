"""VisionZip (Yang et al., 2024): dominant tokens by [CLS] attention, plus contextual tokens merged from the rest.

Following the public code: the budget splits into dominant and contextual tokens as 54 + 10 of 64 (so
contextual = round(5/32 of the budget)); the dominant ones are the [CLS] token itself and the patches [CLS]
attends to most in the feature layer; the remaining patches are merged into evenly spaced targets by
cosine similarity of that layer's keys (mean over heads). Unlike the code, which appends the merged tokens
after the dominant ones in score order, the kept tokens stay in spatial order here, the [CLS] token first
(at the first patch's place) and each merged token at its target patch's place, so that position policies apply to them as to any token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from star import scoring
from star.methods.base import Method, Plan, Selection, VisionView, check_ratio


@dataclass(frozen=True)
class VisionZip(Method):
    name = "visionzip"
    summary = "dominant tokens by [CLS] attention + contextual tokens merged by key similarity"

    contextual_ratio: float = field(default=10 / 64, metadata={"help": "share of the budget given to merged contextual tokens, in [0, 1)"})

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        check_ratio("contextual_ratio", self.contextual_ratio)
        return Plan(n_visual=n_visual, vision_keep=keep)

    def select_vision(self, view: VisionView, k: int) -> Selection:
        if view.prefix_features is None:
            raise ValueError(
                "visionzip keeps the [CLS] token as a dominant token: this model has none its decoder can take"
            )
        n = view.features.shape[1]
        if k == n:
            return Selection(torch.arange(n, device=view.features.device).expand(view.features.shape[0], n))
        contextual = min(round(self.contextual_ratio * k), n - k)
        dominant_patches = k - contextual - 1
        cls_scores = view.cls_attention()
        keys = view.attention[2].mean(dim=1)[:, view.n_prefix :]
        indices, states = [], []
        for image in range(view.features.shape[0]):
            features = view.features[image]
            dominant = scoring.top_k_in_order(cls_scores[image], dominant_patches)
            rest = torch.ones(n, dtype=torch.bool, device=features.device)
            rest[dominant] = False
            rest_index = rest.nonzero().squeeze(1)
            targets, merged = scoring.merge_by_similarity(features[rest_index], keys[image, rest_index], contextual)
            index = torch.cat([dominant, rest_index[targets]])
            state = torch.cat([features[dominant], merged])
            order = index.argsort()
            index, state = index[order], state[order]
            indices.append(index)
            states.append(state)
        return _with_cls_first(torch.stack(indices), torch.stack(states), view.prefix_features)


def _with_cls_first(index: torch.Tensor, states: torch.Tensor, cls: torch.Tensor) -> Selection:
    """Prepend the [CLS] feature as the first kept token; it takes the first patch's place (index 0)."""
    first = index.new_zeros(index.shape[0], 1)
    return Selection(torch.cat([first, index], dim=1), torch.cat([cls[:, None], states], dim=1))
