"""FasterVLM (Zhang et al., 2024): keep the patches the [CLS] token attends to most, before the projector.

The [CLS] row of the feature layer's attention (vision_feature_layer), mean over heads, ranks the patches;
the kept ones stay in spatial order and only they are projected into the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

from star import scoring
from star.methods.base import Method, Plan, Selection, VisionView


@dataclass(frozen=True)
class FasterVLM(Method):
    name = "fastervlm"
    summary = "[CLS] attention of the vision feature layer, before the decoder"

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        return Plan(n_visual=n_visual, vision_keep=keep)

    def select_vision(self, view: VisionView, k: int) -> Selection:
        return Selection(scoring.top_k_in_order(view.cls_attention(), k))
