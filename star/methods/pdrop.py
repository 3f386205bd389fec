"""PyramidDrop (Xing et al., 2024): drop visual tokens in several stages as the decoder gets deeper.

Defaults follow the official code, Cooperx521/PyramidDrop @ 6444f30 (`pdrop_forward` and `pdrop_rank_drop` in
`llava/model/modeling_llama_pdrop.py`; `--layer_list '[8,16,24]' --image_token_ratio_list "[0.5,0.25,0.125]"` in
`scripts/v1_5/pdrop_eval/`): after layers 8, 16, 24 of 32 (L/4, L/2, 3L/4), the next layer's own input norm,
q/k projections and rotary embedding give the last instruction token's attention to the visual tokens, mean
over heads; the top `int(n * lambda^s)` go on, in sequence order, and positions are renumbered without gaps
(positions "contiguous"). The code's lambda = 0.5 keeps 576 -> 288 -> 144 -> 72.

Budget: `keep` is the count after the last stage, so lambda = (keep / n)^(1/3) (0.5 at keep = n / 8, the
code's setting). The paper's 192 / 128 / 64 tokens are averages over the decoder's layers; `budget="average"`
reads `keep` that way and picks the lambda whose schedule averages `keep` visual tokens per layer (the final
count is then lower).

Deliberate differences: scores in float32 for the rows needed (the code builds the full eager map of the
layer); the image tokens are found by their ids; any batch size, each prompt its own ranking.
positions="original" is this project's earlier variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from star import scoring
from star.methods.base import (
    DecoderView, LLMStage, Method, Plan, Selection, check_choice, check_layers, layer_average, staged_plan,
)


@dataclass(frozen=True)
class PyramidDrop(Method):
    name = "pdrop"
    summary = "last instruction token's attention at L/4, L/2, 3L/4, one ratio lambda per stage"
    source = "Cooperx521/PyramidDrop @ 6444f30"
    positions = "contiguous"

    layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "the decoder layers that drop tokens, increasing (None: L/4, L/2, 3L/4)"}
    )
    budget: str = field(default="final", metadata={"help": "what keep counts: 'final' (after the last stage) or 'average' (over the decoder's layers, the paper's tables)"})

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        layers = check_layers(self.layers or tuple(num_layers * s // 4 for s in (1, 2, 3)), num_layers)
        check_choice("budget", self.budget, ("final", "average"))
        if keep == n_visual:
            return Plan(n_visual=n_visual, vision_keep=n_visual)
        if self.budget == "final":
            return staged_plan(n_visual, lambda_counts(n_visual, (keep / n_visual) ** (1 / len(layers)), len(layers), keep), layers)
        fewest = layer_average(n_visual, [(layer, 1) for layer in layers], num_layers)
        if keep < fewest:
            raise ValueError(
                f"keep={keep} with budget='average' is below the fewest visual tokens a schedule at layers {layers} "
                f"averages over {num_layers} layers ({fewest:.1f}, the first {layers[0]} layers see all {n_visual})"
            )
        low, high = 0.0, 1.0
        for _ in range(60):  # the largest lambda whose schedule averages at most `keep`
            ratio = (low + high) / 2
            counts = lambda_counts(n_visual, ratio, len(layers))
            if layer_average(n_visual, list(zip(layers, counts)), num_layers) <= keep:
                low = ratio
            else:
                high = ratio
        return staged_plan(n_visual, lambda_counts(n_visual, low, len(layers)), layers)

    def select_llm(self, stage: LLMStage, view: DecoderView, k: int) -> Selection:
        return Selection(scoring.top_k_in_order(view.attention_to_visual(view.last_token_rows()), k))


def lambda_counts(n_visual: int, ratio: float, stages: int, last: int | None = None) -> list[int]:
    """The code's budgets: int(n * lambda^s) after stage s (never below 1, nor below `last`), the last one `last`
    when given. A hair of slack keeps int() from turning 576 * 0.5 computed as 287.9999... into 287."""
    floor = last or 1
    counts = [max(floor, int(n_visual * ratio ** (s + 1) + 1e-9)) for s in range(stages)]
    return counts[:-1] + [last] if last is not None else counts
