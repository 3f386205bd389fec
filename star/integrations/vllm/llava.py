"""LLaVA-1.5 in vLLM with its visual tokens pruned before the decoder: `StarLlavaForConditionalGeneration`.

Two places change, both vLLM's own multimodal interfaces (docs/serving.md):
- the front end's processor replaces each image's placeholder with as many tokens as the setting keeps, so the
  scheduler reserves KV blocks for the pruned prompt; it also checks the setting (a bad one is the request's
  error) and sends it with each image as a `star_setting` field;
- the model's `embed_multimodal` runs the CLIP tower, hands the feature layer to the method's `select_vision`
  (the same method files and `VisionView` as `star.apply`), and projects only the kept patches, in order.
The decoder, the KV cache, prefix caching and chunked prefill are vLLM's, unchanged, unless the engine's setting
cuts inside the decoder: then the model's forward runs the cut (`star.integrations.vllm.cut`).

What every CLIP-tower class shares (LLaVA-NeXT's in `llava_next.py` too) is here as mixins: `SettingInfo` (the
request's setting), `SettingProcessor` (the setting checked and sent with each image) and `PrunedClip` (the
checks at the model's start, the feature layer and the method's view of it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import nn
from transformers import BatchFeature, CLIPVisionConfig
from vllm.config import VllmConfig
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from star.decoder import gather_seq
from star.integrations.vllm import Setting, parse_setting, serves_cut
from star.integrations.vllm.cut import CutDecoder, check_engine, use_cut_attention
from star.methods import Selection, VisionView

FIELD = "star_setting"
# transformers 5 saves the CLIP tower without its `vision_model.` level (star/compat.py), as the default model's
# checkpoint is; vLLM 0.32's LLaVA classes expect it, so such keys get it back before vLLM's own mapping.
CLIP_LEVEL = WeightsMapper(
    orig_to_new_regex={re.compile(r"^(?:model\.)?vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model."}
)


class SettingInfo:
    """Processing-info mixin: the request's setting."""

    def setting(self, mm_kwargs: Mapping[str, object]) -> Setting:
        """The request's setting (`mm_processor_kwargs["star"]`), else the engine's (`hf_overrides["star"]`)."""
        config = self.get_hf_config()
        engine = engine_setting(config)
        if "star" not in mm_kwargs:
            return engine
        where = "mm_processor_kwargs['star']"
        if engine.cut is not None:
            if parse_setting(mm_kwargs["star"], n_visual(config), num_layers(config), where, cuts=True).text == engine.text:
                return engine
            raise ValueError(
                f"{where}={mm_kwargs['star']!r}: this engine cuts inside the decoder with its own setting {engine.text}, "
                "which every request with an image runs (the decoder's forward sees no request's setting); serve another "
                "setting from an engine of its own"
            )
        return parse_setting(mm_kwargs["star"], n_visual(config), num_layers(config), where)


class SettingProcessor:
    """Multimodal-processor mixin: the setting checked and sent with each image as its `star_setting` field."""

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        setting = self.info.setting(hf_kwargs)
        processed = super()._apply_hf_processor_main(mm_items, {k: v for k, v in hf_kwargs.items() if k != "star"})
        if "pixel_values" in processed:
            text = torch.tensor(list(setting.text.encode()), dtype=torch.uint8)
            processed[FIELD] = text.expand(len(processed["pixel_values"]), -1).clone()
        return processed

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs), FIELD: MultiModalFieldConfig.batched("image", keep_on_cpu=True)}

    def _images(self, mm_items: MultiModalDataItems) -> ImageProcessorItems | None:
        """The request's images, or None; images given as embeddings are refused."""
        if not mm_items.get_all_counts().get("image"):
            return None
        if not isinstance(mm_items["image"], ImageProcessorItems):
            raise ValueError("images given as embeddings cannot be pruned: send the images themselves")
        return mm_items["image"]


class PrunedClip:
    """Model mixin for a vLLM LLaVA-style class with a CLIP tower: the checks at its start, the settings of an
    encoder call, the feature layer and the method's view of it. `star_kept` holds, after each encoder call, the
    kept patches of each image it encoded (for tests and inspection, like `Pruner.stats`)."""

    # With tensor parallelism the scores need the tower's every head on each rank: vLLM's mm_encoder_tp_mode="data"
    # runs vLLM's CLIP whole on every rank, which this class supports.
    supports_encoder_tp_data = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
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

    def _pixel_input(self, kwargs: dict) -> tuple[dict | None, list[str]]:
        """The encoder call's parsed image input (None: no image) and each image's setting as its JSON text."""
        settings = kwargs.pop(FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return None, []
        if image_input["type"] != "pixel_values" or settings is None:
            raise ValueError(f"{image_input['type']} reached the pruned model without its {FIELD}: it cannot be pruned")
        return image_input, [bytes(row.tolist()).decode() for row in settings]

    def _setting(self, text: str) -> Setting:
        return parse_setting(json.loads(text), n_visual(self.config), num_layers(self.config), FIELD, cuts=serves_cut(self.config))

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
        return VisionView(
            features=feature[:, 1:], n_prefix=1, qk=partial(_clip_qk, self.feature_layer, layer_input),
            prefix_features=feature[:, 0], project=self.multi_modal_projector,
        )

    @staticmethod
    def _select(setting: Setting, view: VisionView, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept patches [I, keep] of a view's units (an index into its features) and their features to
        project (the patches', or a method's merged states)."""
        n = view.features.shape[1]
        if keep < n:
            selection = setting.method.select_vision(view, keep)
        else:
            selection = Selection(torch.arange(n, device=view.features.device).expand(view.features.shape[0], n))
        states = selection.states if selection.states is not None else gather_seq(view.features, selection.index)
        return selection.index, states


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
        setting = engine_setting(self.config)
        self.decoder_cut = None
        self.visual_rows: torch.Tensor | None = None  # the step's image rows, from embed_input_ids to forward
        if setting.cut is not None:
            model = self.language_model.model
            for layer in model.layers[setting.cut.layer :]:
                use_cut_attention(layer.self_attn, vllm_config)
            self.decoder_cut = CutDecoder(model, setting)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal: torch.Tensor | None = None, **kwargs):
        if self.decoder_cut is not None:
            self.visual_rows = is_multimodal
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self.decoder_cut is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        visual, self.visual_rows = self.visual_rows, None
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.decoder_cut.forward(positions, inputs_embeds, visual)

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
            index, states = self._select(setting, self._view(feature[rows], layer_input[rows]), setting.keep)
            projected = self.multi_modal_projector(states)
            for unit, row in enumerate(rows.tolist()):
                embeds[row], kept[row] = projected[unit], index[unit].cpu()
        self.star_kept = kept
        return embeds


def engine_setting(config) -> Setting:
    """The engine's default setting, from `hf_overrides["star"]`; the model's own constraints checked first."""
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
    raw = getattr(config, "star", None)
    if raw is None:
        name = (getattr(config, "architectures", None) or ["StarLlavaForConditionalGeneration"])[0]
        raise ValueError(
            f"hf_overrides has no 'star' setting: {name} needs one, e.g. "
            f'--hf-overrides \'{{"architectures": ["{name}"], "star": {{"method": "fastervlm", "keep": 98}}}}\''
        )
    return parse_setting(raw, n_visual(config), num_layers(config), "hf_overrides['star']", cuts=serves_cut(config))



def n_visual(config) -> int:
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def num_layers(config) -> int:
    return config.text_config.num_hidden_layers


def _clip_qk(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of vLLM's CLIP encoder layer (fused q/k/v projection) for its input: [I, H, T, d] each."""
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(layer.layer_norm1(hidden))
    q, k, _ = qkv.chunk(3, dim=-1)
    shape = (*hidden.shape[:2], attn.num_heads, attn.head_dim)
    return q.reshape(shape).transpose(1, 2), k.reshape(shape).transpose(1, 2)
