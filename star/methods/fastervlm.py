"""FasterVLM (Zhang et al., 2024): keep the patches the [CLS] token attends to most, before the projector.

Defaults follow the official code, Theia-4869/FasterVLM @ f5d5f12 (`encode_images` in `llava/model/llava_arch.py`,
`feature_select` in `clip_encoder.py`): the [CLS] row of the feature layer's attention
(`attentions[select_layer][:, :, 0, 1:]`), mean over heads, ranks the patches; the top `keep` stay in spatial
order (a boolean mask), and the shorter prompt is numbered without gaps (positions "contiguous").

Deliberate differences: the [CLS] row is recomputed in float32 from the feature layer's q/k (the code asks CLIP
for every layer's attention in fp16); only the kept patches are projected (the code projects all, then masks:
the same states); any batch size. On LLaVA-NeXT the code forces a "spatial" patch merge (no unpadding, no
newline tokens, `keep` per crop); here the model keeps its own layout (unpadded tiles, newline tokens) and each
crop keeps its budget. positions="original" is this project's earlier variant.
"""

from __future__ import annotations

from dataclasses import dataclass

from star import scoring
from star.methods.base import Method, Plan, Selection, VisionView


@dataclass(frozen=True)
class FasterVLM(Method):
    name = "fastervlm"
    summary = "[CLS] attention of the vision feature layer, before the decoder"
    source = "Theia-4869/FasterVLM @ f5d5f12"
    positions = "contiguous"

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        return Plan(n_visual=n_visual, vision_keep=keep)

    def select_vision(self, view: VisionView, k: int) -> Selection:
        return Selection(scoring.top_k_in_order(view.cls_attention(), k))
