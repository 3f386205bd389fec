"""Qwen3-VL in vLLM with its visual tokens pruned before the decoder: `StarQwen3VLForConditionalGeneration`.

Qwen2-VL's layout (`qwen2_vl.py`: one unit per image, scores from the tower's last layer, original 3-D positions
through vLLM's multimodal-pruning interface) with DeepStack: vLLM's tower gives each merged token its DeepStack
features after its own embedding, in one row; a kept token keeps its row whole, so each kept token's features reach
decoder layers 0-2 with it, as in `star.apply` (`star/adapters/qwen3_vl.py`), and a dropped token's go with it;
a decoder cut before layer 3 (FastV's, or STAR's on a short decoder) carries them on with the kept rows. Under
`pool` a pooled token's features are the mean of its window's, as its embedding is (`Selection.mix`).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from star.integrations.vllm.qwen2_vl import ImagesOnly, PrunedQwen, PrunedQwenProcessor


class StarQwen3VLProcessingInfo(ImagesOnly, Qwen3VLProcessingInfo):
    pass


class StarQwen3VLMultiModalProcessor(PrunedQwenProcessor, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    StarQwen3VLMultiModalProcessor, info=StarQwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class StarQwen3VLForConditionalGeneration(PrunedQwen, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL whose images enter the decoder pruned, DeepStack features with their tokens. `star_kept[i]`:
    image i's kept tokens (indices into its merged tokens, in order)."""

    def _added(self, rows: int) -> list[torch.Tensor]:
        """The step's DeepStack features, one per level (vLLM's buffers, which its own forward empties after use)."""
        levels = self._get_deepstack_input_embeds(rows)
        added = [levels[f"deepstack_input_embeds_{i}"].clone() for i in range(self.deepstack_num_level)]
        self._clear_deepstack_input_embeds(rows)
        return added

    def _features(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An image's merged tokens [n, D] and their DeepStack features [n, E * D] (vLLM's row: the token, then them)."""
        return output[:, : self.visual_dim], output[:, self.visual_dim :]
