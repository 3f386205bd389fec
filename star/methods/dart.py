"""DART (Wen et al., EMNLP 2025): keep a few pivot tokens and the visual tokens that duplicate them least,
early in the decoder. No attention scores, so the model keeps any attention kernel.

Following ZichenWen1/DART at 5a19452 (its last commit, read in the fork xqy1111111/DART;
`llava/model/language_model/modeling_llama_self.py`, `DART.forward` and `get_retained_image_token`, and the
same function in `Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py`):
- Before layer K (2), from layer K-1's work: its keys (after the rotary embedding, all heads side by side)
  and its output passed through the decoder's final norm.
- Pivots: the `pivot_image_tokens` (4) visual tokens and the `pivot_text_tokens` (4) tokens after the image
  (question and assistant prefix) whose keys have the largest L1 norm.
- For each pivot in turn, the visual tokens not yet kept (image pivots excluded) whose normed states have the
  lowest cosine similarity to the pivot's are kept; the image pivots are kept too, the text pivots are not.
- Layers K.. run on the kept tokens at their original positions (positions="original", as FastV).

Budget: the code gives each pivot max_num_trunction // pivots tokens (128 // 8 = 16 for its "128" setting,
which so keeps 4 + 8 x 16 = 132 visual tokens). Here `keep` is the final count: keep - (image pivots) tokens
are split as evenly as possible over the pivots, the earlier pivots taking the remainder, so keep=132 is
the code's "128" exactly. On LLaVA-NeXT the code's budget is one count for the whole image (320 by default,
`retain_token_num_for_llava_next`); here it is `keep` per crop, summed over the prompt's crops.

Where this file departs from the code:
- Pivots are visited in sequence order; the code visits them in the iteration order of a Python set of
  their sequence indices, which is ascending only while the indices are small (as in the tests here).
- The key norm is taken over the layer's key heads before grouped-query attention repeats them (the code
  takes it after, which multiplies every norm by the same factor and ranks alike); cosines in float32.
- The code handles one prompt whose image starts at a hard-coded offset (35); here every prompt of a batch,
  its images found by their token ids (all images of a prompt are its visual tokens; LLaVA-NeXT's newline
  tokens always stay), and fewer pivots where a prompt or budget is smaller than the pivot counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from star.methods.base import DecoderView, LLMStage, Method, Plan, Selection, check_layer
from star.scoring import flagged_in_order, top_k_in_order


@dataclass(frozen=True)
class Dart(Method):
    name = "dart"
    summary = "pivots by key norm at layer K-1, then the tokens least similar to them, pruning before layer K (K=2)"
    source = "ZichenWen1/DART @ 5a19452 (read in its fork xqy1111111/DART)"
    positions = "original"

    layer: int = field(default=2, metadata={"help": "the decoder layer K before which tokens are dropped (pivots from layer K-1)"})
    pivot_image_tokens: int = field(default=4, metadata={"help": "visual pivot tokens (largest key L1 norm), at least 1"})
    pivot_text_tokens: int = field(default=4, metadata={"help": "text pivot tokens after the image (largest key L1 norm), at least 0"})

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        layer = check_layer("layer", self.layer, num_layers)
        for name, least in (("pivot_image_tokens", 1), ("pivot_text_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r} must be an integer >= {least}")
        stages = (LLMStage(layer=layer, keep=keep, score_layer=layer - 1),) if keep < n_visual else ()
        return Plan(n_visual=n_visual, vision_keep=n_visual, llm_stages=stages)

    def select_llm(self, stage: LLMStage, view: DecoderView, k: int) -> Selection:
        key_norm = view.keys().float().abs().sum(dim=(1, 3))
        states = torch.nn.functional.normalize(view.normed_states().float(), dim=-1)
        rows = view.text_rows()[0]
        width = rows.shape[1]
        chosen = []
        for b, n_text in enumerate(view.text_counts):
            text = rows[b, width - n_text :]
            chosen.append(
                least_duplicated(states[b], key_norm[b], view.visual[b], text, k, self.pivot_image_tokens, self.pivot_text_tokens)
            )
        return Selection(torch.stack(chosen))


def least_duplicated(
    states: torch.Tensor, key_norm: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, k: int, image_pivots: int, text_pivots: int
) -> torch.Tensor:
    """DART's choice for one prompt: [k] ascending places among `visual`.

    states: [S, D] unit-normed states, key_norm: [S], visual: [V] and text: [T] sequence indices. Every count
    is known on the host: each pivot takes its share of the tokens still free, or what is left.
    """
    n = visual.shape[0]
    image = top_k_in_order(key_norm[visual], min(image_pivots, k, n))
    pivots = torch.cat([visual[image], text[top_k_in_order(key_norm[text], min(text_pivots, len(text)))]]).sort().values
    similarity = states[visual] @ states[pivots].T
    free = torch.ones(n, dtype=torch.bool, device=visual.device)
    free[image] = False
    left = n - len(image)
    share, extra = divmod(k - len(image), len(pivots))
    for turn in range(len(pivots)):
        count = min(share + (turn < extra), left)
        free[torch.sort(similarity[:, turn].masked_fill(~free, float("inf")), stable=True).indices[:count]] = False
        left -= count
    return flagged_in_order(~free, n - left)
