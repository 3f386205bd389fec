"""VisPruner (Zhang et al., ICCV 2025): important patches by the vision encoder's attention, then diverse ones
from the rest by removing near-duplicates, before the decoder.

Following Theia-4869/VisPruner at aefa01a (`llava/model/llava_arch.py`, `encode_images`):
- Important: int(keep * important_ratio) patches (ratio 0.5 by default, the code's `--important_ratio`), the
  ones the [CLS] token attends to most in the feature layer, mean over heads (`clip_encoder.py`,
  `feature_select`: `attentions[select_layer][:, :, 0, 1:]`).
- Diverse: the other patches, in falling attention order, are pruned in rounds until the budget is met. Each
  round splits them alternately into A (1st, 3rd, ...) and B (2nd, 4th, ...), gives each A patch its highest
  cosine similarity to a B patch (features of the feature layer, before the projector), drops the r A
  patches most similar to B (r = min(8, what is still over budget)) and goes on with the rest of A, in
  falling similarity order, followed by B.
- The kept patches enter the decoder in spatial order.

Where this file departs from the code:
- Encoders without [CLS] (Qwen2-VL): the code's SigLIP path ranks by the attention each patch receives in
  the encoder's last layer, averaged over query rows and heads; here that is the tower's last full-attention
  layer, summed over the patches the merger fuses into one token, and the similarity is over the merged
  tokens (the only features one decoder token has).
- Odd counts: the code indexes A's survivors as if the patches left over were even in number; when a
  round starts on an odd number, it keeps fewer patches than the budget (or fails). Here A holds the extra
  one and the budget is met.
- Ties fall to the lower index (a stable sort), and similarities are computed in float32.
- LLaVA-NeXT: the code drops unpadding and the newline tokens and keeps `keep` of every 576-token crop;
  here every crop keeps `keep` (a tile that unpadding cuts, its share of the patches it shows) and the
  newline tokens stay, as for every method.
- Positions: the code hands the decoder the shorter sequence, numbered without gaps (positions="contiguous");
  `positions` is the caller's choice here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from star.decoder import gather_seq
from star.methods.base import Method, Plan, Selection, VisionView

# The code's largest number of patches dropped in one round.
ROUND = 8


@dataclass(frozen=True)
class VisPruner(Method):
    name = "vispruner"
    summary = "important patches by [CLS] attention, then diverse ones by dropping near-duplicates, before the decoder"

    important_ratio: float = field(default=0.5, metadata={"help": "share of the budget kept by attention (the rest by diversity), in [0, 1]"})

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        ratio = self.important_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"important_ratio={ratio!r} is not a fraction in [0, 1]")
        return Plan(n_visual=n_visual, vision_keep=keep)

    def select_vision(self, view: VisionView, k: int) -> Selection:
        scores = view.cls_attention() if view.n_prefix else view.received()
        important = int(k * self.important_ratio)
        return Selection(important_then_diverse(scores, view.features, important, k - important))


def important_then_diverse(scores: torch.Tensor, features: torch.Tensor, important: int, diverse: int) -> torch.Tensor:
    """The `important` top-scored patches and `diverse` others left after dropping near-duplicates, [I, k] in
    ascending order. scores: [I, N], features: [I, N, D]."""
    normed = torch.nn.functional.normalize(features.float(), dim=-1)
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    kept, rest = order[:, :important], order[:, important:]
    while diverse > 0 and rest.shape[1] > diverse:
        drop = min(ROUND, rest.shape[1] - diverse)
        a, b = rest[:, 0::2], rest[:, 1::2]
        closest = (gather_seq(normed, a) @ gather_seq(normed, b).transpose(1, 2)).max(dim=-1).values
        distinct = torch.sort(closest, dim=-1, descending=True, stable=True).indices[:, drop:]
        rest = torch.cat([a.gather(1, distinct), b], dim=1)
    chosen = torch.cat([kept, rest], dim=1) if diverse > 0 else kept
    return chosen.sort(dim=-1).values
