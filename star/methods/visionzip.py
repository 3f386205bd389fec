"""VisionZip (Yang et al., 2024): dominant tokens by [CLS] attention, plus contextual tokens merged from the rest.

Defaults follow the official code, dvlab-research/VisionZip @ 3151f6d (`visionzip/clip_encoder.py`,
`CLIPVisionTower_VisionZip.forward`; `visionzip/utils.py` for the keys):
- budget: dominant + contextual as 54 + 10 of 64 (contextual = round(10/64 of the budget)); the [CLS] token is
  one of the dominant ones, so `dominant - 1` patches are the top of the [CLS] row of the feature layer's
  attention (summed over heads there, averaged here: the same ranking);
- contextual: the other patches, every `n // contextual`-th a target; each of the rest joins the target whose key
  (the feature layer's keys, averaged over heads) is most similar by cosine; a contextual token is its target's
  state *plus the mean* of the states assigned to it (`merge="official"`);
- order: [CLS, dominant patches in spatial order, contextual tokens in target order] (`order="official"`), and
  the decoder numbers them without gaps (positions "contiguous", as the shorter LLaVA prompt is).

Deliberate differences: scores and merging in float32 (the code runs fp16); any batch size (the code's
per-image loop handles one list element at a time); the [CLS] row and keys come from recomputing the feature
layer's q/k, not from patched CLIP classes. On LLaVA-NeXT the code forces a "spatial" patch merge (no unpadding,
no newline tokens); here the model keeps its own layout and each crop keeps its budget.

In the official order the contextual tokens share the place of the last dominant patch (they have none of their
own), so `stats.kept_patches` lists that place for them. `order="spatial", merge="mean"` with
positions="original" is this project's earlier variant: every kept token at its patch's place (the [CLS] token
at the first patch's), each contextual token the mean of its target and its assigned tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from star import scoring
from star.methods.base import Method, Plan, Selection, VisionView, check_choice, check_ratio

MERGES = {"official": "target_plus_mean", "mean": "mean"}


@dataclass(frozen=True)
class VisionZip(Method):
    name = "visionzip"
    summary = "dominant tokens by [CLS] attention + contextual tokens merged by key similarity"
    source = "dvlab-research/VisionZip @ 3151f6d"
    positions = "contiguous"

    contextual_ratio: float = field(default=10 / 64, metadata={"help": "share of the budget given to merged contextual tokens, in [0, 1)"})
    merge: str = field(default="official", metadata={"help": "contextual token: 'official' (target + mean of its tokens) or 'mean' (mean of target and tokens)"})
    order: str = field(default="official", metadata={"help": "'official' ([CLS], dominant, contextual) or 'spatial' (each token at its patch's place)"})

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        check_ratio("contextual_ratio", self.contextual_ratio)
        check_choice("merge", self.merge, tuple(MERGES))
        check_choice("order", self.order, ("official", "spatial"))
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
            rest_index = scoring.complement_in_order(dominant, n)
            targets, merged = scoring.merge_by_similarity(features[rest_index], keys[image, rest_index], contextual, MERGES[self.merge])
            cls = view.prefix_features[image, None]
            if self.order == "official":
                last = dominant[-1:] if dominant_patches else dominant.new_zeros(1)
                index = torch.cat([dominant.new_zeros(1), dominant, last.expand(contextual)])
                state = torch.cat([cls, features[dominant], merged])
            else:
                place = torch.cat([dominant, rest_index[targets]])
                order = place.argsort()
                index = torch.cat([place.new_zeros(1), place[order]])
                state = torch.cat([cls, torch.cat([features[dominant], merged])[order]])
            indices.append(index)
            states.append(state)
        return Selection(torch.stack(indices), torch.stack(states))
