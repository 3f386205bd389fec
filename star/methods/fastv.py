"""FastV (Chen et al., 2024): drop the visual tokens the last prompt token attends to least, early in the decoder.

Defaults follow the official code, pkunlp-icler/FastV @ d165972 (`fastv_forward` in its
`llava-hf/transformers/.../modeling_llama.py`): layer K-1's attention map (`layer_outputs[1]`), the last prompt
token's row, mean over heads, ranks the visual tokens; the top ones stay in sequence order and layers K..L-1
run without the others, K = 2; the kept tokens keep their original positions (`position_ids = keep_indexs`).

Deliberate differences: the attention row is recomputed in float32 for the one layer that needs it (the code
asks the model for every layer's eager attention); the image tokens are found by their ids (the code hard-codes
them at 35 + 576); any batch size. `keep` is the count after the cut (the paper's R = 50% is keep = n / 2).
Pruning happens once, at prefill, and the cache of layers >= K holds the kept tokens: the code's KV-cache
variant. The paper's numbers come from `use_cache=False`, which re-selects at every decode step from the newest
token; the first answer token is the same either way, later ones may differ. Here `generate(use_cache=False)` keeps
the prompt's selection at every step (star.pruner.entry.continues), so it answers as the cache does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from star import scoring
from star.methods.base import DecoderView, LLMStage, Method, Plan, Selection, check_layer


@dataclass(frozen=True)
class FastV(Method):
    name = "fastv"
    summary = "last prompt token's attention at layer K-1, pruning before layer K (K=2)"
    source = "pkunlp-icler/FastV @ d165972"
    positions = "original"

    layer: int = field(default=2, metadata={"help": "the decoder layer K before which tokens are dropped (ranked by layer K-1)"})

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        layer = check_layer("layer", self.layer, num_layers)
        stages = (LLMStage(layer=layer, keep=keep, score_layer=layer - 1),) if keep < n_visual else ()
        return Plan(n_visual=n_visual, vision_keep=n_visual, llm_stages=stages)

    def select_llm(self, stage: LLMStage, view: DecoderView, k: int) -> Selection:
        return Selection(scoring.top_k_in_order(view.attention_to_visual(view.last_token_rows()), k))
