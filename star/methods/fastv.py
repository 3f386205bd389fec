"""FastV (Chen et al., 2024): drop the visual tokens the last prompt token attends to least, early in the decoder.

Following the public code: the attention map of layer K-1 (the last prompt token's row, mean over heads)
ranks the tokens, and layers K..L-1 run without the dropped ones; K = 2 by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from star import scoring
from star.methods.base import DecoderView, LLMStage, Method, Plan, Selection, check_layer


@dataclass(frozen=True)
class FastV(Method):
    name = "fastv"
    summary = "last prompt token's attention at layer K-1, pruning before layer K (K=2)"

    layer: int = field(default=2, metadata={"help": "the decoder layer K before which tokens are dropped (ranked by layer K-1)"})

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        layer = check_layer("layer", self.layer, num_layers)
        stages = (LLMStage(layer=layer, keep=keep, score_layer=layer - 1),) if keep < n_visual else ()
        return Plan(n_visual=n_visual, vision_keep=n_visual, llm_stages=stages)

    def select_llm(self, stage: LLMStage, view: DecoderView, k: int) -> Selection:
        return Selection(scoring.top_k_in_order(view.attention_to_visual(view.last_token_rows()), k))
