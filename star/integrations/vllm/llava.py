"""LLaVA-1.5 in vLLM with its visual tokens pruned before the decoder: `StarLlavaForConditionalGeneration`.

Two places change, both vLLM's own multimodal interfaces (docs/serving.md):
- the front end's processor replaces each image's placeholder with as many tokens as the setting keeps, so the
  scheduler reserves KV blocks for the pruned prompt; it also checks the setting (a bad one is the request's
  error) and sends it with each image as a `star_setting` field;
- the model's `embed_multimodal` runs the CLIP tower, hands the feature layer to the method's `select_vision`
  (the same method files and `VisionView` as `star.apply`), and projects only the kept patches, in order.
The decoder, the KV cache, prefix caching and chunked prefill are vLLM's, unchanged, unless the engine's setting
cuts inside the decoder: then the model's forward runs the cut (`star.integrations.vllm.cut`).

What every CLIP-tower class shares (LLaVA-NeXT's in `llava_next.py` too) is here: `PrunedClip` (the checks at the
model's start, the feature layer and the method's view of it); what every served family shares is in `served.py`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import nn
from transformers import CLIPVisionConfig
from vllm.config import VllmConfig
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from star.integrations.vllm import engine_setting
from star.integrations.vllm.cut import check_engine, cut_decoder, cuts, profile_run
from star.integrations.vllm.served import PrunedEncoder, SettingInfo, SettingProcessor
from star.methods import VisionView

# transformers 5 saves the CLIP tower without its `vision_model.` level (star/compat.py), as the default model's
# checkpoint is; vLLM 0.32's LLaVA classes expect it, so such keys get it back before vLLM's own mapping.
CLIP_LEVEL = WeightsMapper(
    orig_to_new_regex={re.compile(r"^(?:model\.)?vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model."}
)


class PrunedClip(PrunedEncoder):
    """Model mixin for a vLLM LLaVA-style class with a CLIP tower: the checks at its start, the feature layer and
    the method's view of it."""

    # With tensor parallelism the scores need the tower's every head on each rank: vLLM's mm_encoder_tp_mode="data"
    # runs vLLM's CLIP whole on every rank, which this class supports.
    supports_encoder_tp_data = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        check_clip(config)
        setting = engine_setting(config)  # a bad setting stops the engine here, before any weight loads
        if setting.cut is not None:
            check_engine(vllm_config, setting)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        feature = self.feature_layer.self_attn
        if feature.num_heads_per_partition != feature.num_heads:
            raise ValueError(
                f"tensor parallel vision tower ({feature.num_heads_per_partition} of {feature.num_heads} heads per "
                "process): the scores need every head of the feature layer; serve with mm_encoder_tp_mode='data' "
                "(--mm-encoder-tp-mode data), which runs the tower whole on each rank, or tensor_parallel_size=1"
            )
        self.star_kept: list[torch.Tensor] = []

    @property
    def feature_layer(self) -> nn.Module:
        """The CLIP layer whose output the projector receives: vLLM builds the tower only up to it, so its last."""
        return self.vision_tower.vision_model.encoder.layers[-1]

    def _feature_layer(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The feature layer's output and input, [I, 1 + N, D] each ([CLS] first)."""
        vision = self.vision_tower.vision_model
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for layer in vision.encoder.layers[:-1]:
            hidden = layer(hidden)
        return self.feature_layer(hidden), hidden

    def _view(self, feature: torch.Tensor, layer_input: torch.Tensor) -> VisionView:
        """The method's view of whole crops (images) [I, 1 + N, D], as `star.apply`'s: no instruction, which the
        encoder step does not see (CDPruner then weighs every token alike)."""
        side = round((feature.shape[1] - 1) ** 0.5)
        return VisionView(
            features=feature[:, 1:], n_prefix=1, qk=partial(_clip_qk, self.feature_layer, layer_input),
            prefix_features=feature[:, 0], project=self.multi_modal_projector, grid=(side, side),
        )


class StarLlavaProcessingInfo(SettingInfo, LlavaProcessingInfo):
    pass


class StarLlavaMultiModalProcessor(SettingProcessor, LlavaMultiModalProcessor):
    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: MultiModalKwargsItems
    ) -> Sequence[PromptUpdate]:
        self._images(mm_items)
        setting = self.info.setting(hf_processor_mm_kwargs)
        token = self.info.get_hf_config().image_token_index
        return [PromptReplacement(modality="image", target=[token], replacement=[token] * setting.keep)]


@MULTIMODAL_REGISTRY.register_processor(
    StarLlavaMultiModalProcessor, info=StarLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class StarLlavaForConditionalGeneration(PrunedClip, LlavaForConditionalGeneration):
    """vLLM's LLaVA whose images enter the decoder pruned, and where the engine's setting cuts inside the decoder,
    are cut there (`star.integrations.vllm.cut`). `star_kept[i]`: image i's kept patch indices (its vision stage)."""

    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | CLIP_LEVEL

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.decoder_cut = cut_decoder(self.language_model.model, engine_setting(self.config), vllm_config)
        self.visual_rows: torch.Tensor | None = None  # the step's image rows, from embed_input_ids to forward

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal: torch.Tensor | None = None, **kwargs):
        if self.decoder_cut is not None:
            self.visual_rows = is_multimodal
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        visual, self.visual_rows = self.visual_rows, None
        if cuts(visual):
            return self.decoder_cut.forward(positions, inputs_embeds, visual)
        hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if self.decoder_cut is not None and profile_run():
            self.decoder_cut.compile(positions, inputs_embeds)
        return hidden

    def embed_multimodal(self, **kwargs: object):
        image_input, texts = self._pixel_input(kwargs)
        if image_input is None:
            return []
        feature, layer_input = self._feature_layer(image_input["pixel_values"])
        embeds: list[torch.Tensor | None] = [None] * len(texts)
        kept: list[torch.Tensor | None] = [None] * len(texts)
        for text in dict.fromkeys(texts):  # the images of one encoder call, grouped by setting
            setting = self._setting(text)
            rows = torch.tensor([i for i, t in enumerate(texts) if t == text], device=feature.device)
            selection = self._select(setting, self._view(feature[rows], layer_input[rows]), setting.keep)
            projected = self.multi_modal_projector(selection.states)
            for unit, row in enumerate(rows.tolist()):
                embeds[row], kept[row] = projected[unit], selection.index[unit].cpu()
        self.star_kept = kept
        return embeds


def check_clip(config) -> None:
    """What the pruned CLIP-tower classes need of the model, checked before its setting."""
    if not isinstance(config.vision_config, CLIPVisionConfig):
        raise ValueError(
            f"vision_config of type {type(config.vision_config).__name__} is not supported: the pruned LLaVA needs a "
            "CLIP tower (its [CLS] token and layout are what the methods score)"
        )
    if not isinstance(config.vision_feature_layer, int) or config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_layer={config.vision_feature_layer!r}, vision_feature_select_strategy="
            f"{config.vision_feature_select_strategy!r}: the pruned LLaVA needs one integer layer and 'default'"
        )


def _clip_qk(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of vLLM's CLIP encoder layer (fused q/k/v projection) for its input: [I, H, T, d] each."""
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(layer.layer_norm1(hidden))
    q, k, _ = qkv.chunk(3, dim=-1)
    shape = (*hidden.shape[:2], attn.num_heads, attn.head_dim)
    return q.reshape(shape).transpose(1, 2), k.reshape(shape).transpose(1, 2)
