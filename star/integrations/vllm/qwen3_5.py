"""Qwen3.5 in vLLM with its visual tokens pruned before the decoder: `StarQwen3_5ForConditionalGeneration`.

Qwen3.5's tower is Qwen3-VL's without DeepStack, in front of a hybrid decoder (linear-attention layers with their
own recurrent state, and full-attention layers): the vision stage is Qwen2-VL's (`qwen2_vl.py`), and the decoder,
its caches and their states are vLLM's, unchanged, over the pruned prompt. A decoder cut is not served here.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3_5 import Qwen3_5ForConditionalGeneration, Qwen3_5ProcessingInfo
from vllm.model_executor.models.qwen3_vl import Qwen3VLDummyInputsBuilder
from vllm.multimodal import MULTIMODAL_REGISTRY

from star.integrations.vllm.qwen2_vl import ImagesOnly, PrunedQwen
from star.integrations.vllm.qwen3_vl import StarQwen3VLMultiModalProcessor


class StarQwen3_5ProcessingInfo(ImagesOnly, Qwen3_5ProcessingInfo):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    StarQwen3VLMultiModalProcessor, info=StarQwen3_5ProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class StarQwen3_5ForConditionalGeneration(PrunedQwen, Qwen3_5ForConditionalGeneration):
    """vLLM's Qwen3.5 whose images enter the decoder pruned. `star_kept[i]`: image i's kept tokens (indices into
    its merged tokens, in order)."""
