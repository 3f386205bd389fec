"""PyramidDrop (Xing et al., 2024): drop visual tokens in several stages as the decoder gets deeper.

Following the public code: at each stage layer (L/4, L/2, 3L/4: 8, 16, 24 of 32), that layer's own input
norm, q/k projections and rotary embedding give the last instruction token's attention to the visual
tokens, and the top ones go on. The code shrinks by a fixed ratio per stage (0.5); here the ratio is the
geometric one that ends at `keep`, so every method is compared at the same final budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from star import scoring
from star.methods.base import DecoderView, LLMStage, Method, Plan, Selection, geometric_plan


@dataclass(frozen=True)
class PyramidDrop(Method):
    name = "pdrop"
    summary = "last instruction token's attention at L/4, L/2, 3L/4, geometric budgets"

    layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "the decoder layers that drop tokens, increasing (None: L/4, L/2, 3L/4)"}
    )

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        layers = self.layers or tuple(num_layers * s // 4 for s in (1, 2, 3))
        return geometric_plan(n_visual, keep, layers, num_layers)

    def select_llm(self, stage: LLMStage, view: DecoderView, k: int) -> Selection:
        return Selection(scoring.top_k_in_order(view.attention_to_visual(view.last_token_rows()), k))
