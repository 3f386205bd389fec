"""STAR: Stage-wise Attention-guided token Reduction (the paper's sections 3.2 and 3.3).

Stage 1, in the vision encoder: a patch matters if the other patches attend to it. Score each patch by the
attention it receives in the feature layer (the column mean of that layer's attention, over all query rows,
[CLS] included, then over heads; a row mean of a softmax is constant, so the column mean is the reading that
ranks), and keep the top (1 - stage1_ratio) of them, in spatial order.

Stage 2, at decoder layer `layer` (K): a visual token matters if the text attends to it. Score each remaining
visual token by the attention from the text rows (every prompt token after the last image token: the
question and the assistant prefix), mean over rows and heads, and keep `keep`. The paper scores against
"query + generated response"; pruning happens once, at prefill, when no response exists yet, so the rows
are the prompt's. Layers K..L-1 then run, and cache, only the kept tokens.

`star-vision` is stage 1 alone, down to the final budget: the part of STAR that a serving engine can run
(star/integrations/vllm, docs/serving.md). It has its own name so that no table mistakes it for STAR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from star import scoring
from star.methods.base import DecoderView, LLMStage, Method, Plan, Selection, VisionView, check_layer, check_ratio


@dataclass(frozen=True)
class Star(Method):
    name = "star"
    summary = "vision self-attention (stage 1) then text-to-image attention at layer K (stage 2)"

    layer: int | None = field(default=None, metadata={"help": "the decoder layer K of stage 2 (None: half the decoder's depth)"})
    stage1_ratio: float = field(default=0.15, metadata={"help": "share of the patches stage 1 drops in the vision encoder, in [0, 1)"})

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        layer = check_layer("layer", num_layers // 2 if self.layer is None else self.layer, num_layers)
        ratio = check_ratio("stage1_ratio", self.stage1_ratio)
        vision_keep = max(keep, round((1.0 - ratio) * n_visual))
        stages = (LLMStage(layer=layer, keep=keep, score_layer=layer),) if keep < vision_keep else ()
        return Plan(n_visual=n_visual, vision_keep=vision_keep, llm_stages=stages)

    def select_vision(self, view: VisionView, k: int) -> Selection:
        return select_received(view, k)

    def select_llm(self, stage: LLMStage, view: DecoderView, k: int) -> Selection:
        rows, row_mask = view.text_rows()
        return Selection(scoring.top_k_in_order(view.attention_to_visual(rows, row_mask), k))


@dataclass(frozen=True)
class StarVision(Method):
    name = "star-vision"
    summary = "STAR's stage 1 alone (vision self-attention), down to the final budget, before the decoder"

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        return Plan(n_visual=n_visual, vision_keep=keep)

    def select_vision(self, view: VisionView, k: int) -> Selection:
        return select_received(view, k)


def select_received(view: VisionView, k: int) -> Selection:
    """STAR's stage-1 rule: the k patches that receive the most attention in the feature layer, in order."""
    return Selection(scoring.top_k_in_order(view.received(), k))
