"""What every served family shares: the request's setting (`SettingInfo`), the setting checked and sent with
each image (`SettingProcessor`), and the model's side of it (`PrunedEncoder`: each image's setting back from its
field, the method's selection on a view of the tower, the kept tokens for inspection).

A setting travels from the front end to the model as the image's `star_setting` field, its JSON as bytes (vLLM's
multimodal fields carry tensors), so it is part of vLLM's multimodal hash: the processor, encoder and prefix caches
never mix settings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems

from star.decoder import gather_seq
from star.integrations.vllm import Setting, config_setting, engine_setting
from star.methods import Selection, VisionView

FIELD = "star_setting"


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
            if config_setting(mm_kwargs["star"], config, where, cuts=True).text == engine.text:
                return engine
            raise ValueError(
                f"{where}={mm_kwargs['star']!r}: this engine cuts inside the decoder with its own setting {engine.text}, "
                "which every request with an image runs (the decoder's forward sees no request's setting); serve another "
                "setting from an engine of its own"
            )
        return config_setting(mm_kwargs["star"], config, where, cuts=False)


class SettingProcessor:
    """Multimodal-processor mixin: the setting checked and sent with each image as its `star_setting` field."""

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        setting = self.info.setting(hf_kwargs)
        processed = super()._apply_hf_processor_main(mm_items, {k: v for k, v in hf_kwargs.items() if k != "star"})
        images = mm_items.get_all_counts().get("image", 0)
        if images:
            text = torch.tensor(list(setting.text.encode()), dtype=torch.uint8)
            processed[FIELD] = text.expand(images, -1).clone()
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


class PrunedEncoder:
    """Model mixin: each image's setting, and the method's selection on the tower's view of a group of images.
    `star_kept` holds, after each encoder call, the kept tokens of each image it encoded (for tests and inspection,
    like `Pruner.stats`)."""

    star_kept: list[torch.Tensor]

    def _pixel_input(self, kwargs: dict) -> tuple[dict | None, list[str]]:
        """The encoder call's parsed image input (None: no image) and each image's setting as its JSON text; a pixel
        input without its settings (or images as embeddings) cannot be pruned and is refused."""
        settings = kwargs.pop(FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return None, []
        if image_input["type"] != "pixel_values" or settings is None:
            raise ValueError(f"{image_input['type']} reached the pruned model without its {FIELD}: it cannot be pruned")
        return image_input, [setting_text(row) for row in settings]

    def _setting(self, text: str) -> Setting:
        return config_setting(json.loads(text), self.config, FIELD)

    @staticmethod
    def _select(setting: Setting, view: VisionView, keep: int) -> Selection:
        """The method's selection of `keep` tokens from each of a view's units, its `states` always set: the kept
        tokens' features (the tokens', or a method's merged states), [I, keep, D]; its `index` [I, keep] into the
        view's features, and where the kept tokens are means of windows (pool) their `mix` and `grid`."""
        n = view.features.shape[1]
        if keep < n:
            selection = setting.method.select_vision(view, keep)
        else:
            selection = Selection(torch.arange(n, device=view.features.device).expand(view.features.shape[0], n))
        if selection.states is None:
            selection = replace(selection, states=gather_seq(view.features, selection.index))
        return selection


def setting_text(field: torch.Tensor) -> str:
    """A setting's JSON from an image's `star_setting` field."""
    return bytes(field.tolist()).decode()
