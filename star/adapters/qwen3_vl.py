"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, and `Qwen3VLMoeForConditionalGeneration`, its mixture-of-experts
decoder): Qwen2-VL's layout with DeepStack.

As in Qwen2-VL, each image is one block of t * h * w / 4 tokens between vision start and end tokens, the 2 x 2
merger is the projector, there is no [CLS], and the decoder's 3-D positions (here interleaved over the rotary
dimensions) come from `get_rope_index`; the decoder normalises each head's queries and keys. DeepStack: the
tower's `deepstack_visual_indexes` layers each feed their own merger, and what they give each visual token is
added onto that token's hidden state after decoder layers 0, 1, 2, ...

Stage 1 (the unit is an image) is Qwen2-VL's: a token's score is the attention its four patches receive in
the tower's last layer. A kept token keeps its DeepStack features; a dropped one loses them with it. A decoder
stage may cut before the last layer that receives them: the features go on with the tokens that remain, so
every layer adds them exactly where the unpruned model would for those tokens (a merged token takes those of
the place it takes). `keep` counts tokens per image, as for Qwen2-VL.
"""

from __future__ import annotations

import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from star import compat
from star.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_classes = (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)
    budget_note = "tokens per image (each image its own size); DeepStack features go with their tokens"
    synthetic_patches = 64  # 1024 px at 16 px patches: 1024 merged tokens, star/configs/qwen3-vl-8b.json's image

    def __init__(self, model: Qwen3VLForConditionalGeneration | Qwen3VLMoeForConditionalGeneration):
        super().__init__(model)
        self.residual_layers = len(self.visual.deepstack_visual_indexes)

    def tower(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged tokens [T, D] and their DeepStack features [T, E, D], E = len(deepstack_visual_indexes)."""
        return compat.deepstack_tokens(self.visual(pixel_values, grid_thw=grid))
