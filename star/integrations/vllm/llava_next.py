"""LLaVA-NeXT in vLLM with its visual tokens pruned before the decoder: `StarLlavaNextForConditionalGeneration`.

As in `star/adapters/llava_next.py`, each crop (the base image, each tile of the grid) is one unit: a whole crop
keeps `keep` of its tokens (a count per crop of n_visual tokens, or a fraction), a tile that unpadding cuts keeps
its share of the patches it shows (`star.pruner.budget.unit_keep`), a tile it hides entirely is no unit, and the
newline tokens always stay and are never counted. The kept tokens keep vLLM's (and transformers') packing
order: the base crop's, then the tiles' as one picture, row by row, each row ended by its newline.

- The processor's placeholder count for an image follows from the setting and the image's size alone: the
  packing's layout (which crop and patch each token of the unpruned block holds, `layout`) says how many patches
  of each crop the prompt shows, and each crop's budget and the newlines add up to the count.
- `embed_multimodal` runs the CLIP tower on the real crops of each image (not the processor's padding crops),
  selects within each crop with the method's `select_vision` (whole crops of one setting together, a cut tile
  alone with the attention of its whole crop read at the shown patches, `PartialCropView`), projects the kept
  patches and lays them out with the newlines in the layout's order: the prompt `star.apply(...,
  positions="contiguous")` builds for the same image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache, partial
from types import SimpleNamespace

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from star.adapters.llava_next import PartialCropView, shown_grid
from star.integrations.vllm import Setting, n_visual
from star.integrations.vllm.llava import CLIP_LEVEL, PrunedClip, _clip_qk
from star.integrations.vllm.served import SettingInfo, SettingProcessor


def layout(config, height: int, width: int) -> torch.Tensor:
    """What each token of an image's unpruned block holds: crop * n_visual + patch, or -1 for a newline ([T]).

    vLLM's own packing (`_merge_image_patch_embeddings`, "spatial_unpad") applied to patch numbers instead of
    features, as the Hugging Face adapter applies transformers' `pack_image_features`.
    """
    vision = config.vision_config
    pinpoints = tuple(tuple(p) for p in config.image_grid_pinpoints)
    return _layout(pinpoints, vision.image_size, vision.patch_size, height, width).clone()


@lru_cache(maxsize=1024)
def _layout(pinpoints: tuple, image_size: int, patch_size: int, height: int, width: int) -> torch.Tensor:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    rows, cols = get_anyres_image_grid_shape((height, width), [list(p) for p in pinpoints], image_size)
    n = (image_size // patch_size) ** 2
    crops = 1 + rows * cols
    stand_in = SimpleNamespace(
        config=SimpleNamespace(
            vision_config=SimpleNamespace(image_size=image_size, patch_size=patch_size), image_grid_pinpoints=[list(p) for p in pinpoints]
        ),
        image_newline=torch.tensor([-1.0], dtype=torch.float64),
    )
    numbers = torch.arange(crops * n, dtype=torch.float64).view(crops, n, 1)
    packed = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
        stand_in, torch.tensor([height, width]), numbers, strategy="spatial_unpad"
    )
    return packed[:, 0].long()


def crops_of(config, height: int, width: int) -> int:
    """The crops the processor makes of an image (the base image and the grid's tiles)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches((height, width), config.image_grid_pinpoints, config.vision_config.image_size)


def shown(config, height: int, width: int) -> list[torch.Tensor]:
    """The patches of each crop the prompt shows (all n_visual for the base crop and uncut tiles), in order."""
    tokens = layout(config, height, width)
    patches = tokens[tokens >= 0]
    n = n_visual(config)
    return [patches[patches // n == crop] % n for crop in range(crops_of(config, height, width))]


def pruned_tokens(config, setting: Setting, height: int, width: int) -> int:
    """The image's placeholder count under `setting`: each shown crop's budget (for pool, that of the grid of the
    patches it shows), and every newline."""
    tokens = layout(config, height, width)
    newlines = int((tokens < 0).sum())
    side = config.vision_config.image_size // config.vision_config.patch_size
    return newlines + sum(setting.unit_keep(len(p), shown_grid(p, side)) for p in shown(config, height, width) if len(p))


class StarLlavaNextProcessingInfo(SettingInfo, LlavaNextProcessingInfo):
    pass


class StarLlavaNextMultiModalProcessor(SettingProcessor, LlavaNextMultiModalProcessor):
    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: MultiModalKwargsItems
    ) -> Sequence[PromptUpdate]:
        images = self._images(mm_items)
        setting = self.info.setting(hf_processor_mm_kwargs)
        config = self.info.get_hf_config()
        token = config.image_token_index

        def replacement(item: int) -> list[int]:
            size = images.get_image_size(item)
            return [token] * pruned_tokens(config, setting, size.height, size.width)

        return [PromptReplacement(modality="image", target=[token], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    StarLlavaNextMultiModalProcessor, info=StarLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class StarLlavaNextForConditionalGeneration(PrunedClip, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT whose images enter the decoder pruned. `star_kept[i]`: the places of image i's kept
    tokens in its unpruned block (newlines count as places there, as among the prompt's image tokens), in the
    order they enter the decoder."""

    hf_to_vllm_mapper = LlavaNextForConditionalGeneration.hf_to_vllm_mapper | CLIP_LEVEL

    def embed_multimodal(self, **kwargs: object):
        image_input, texts = self._pixel_input(kwargs)
        if image_input is None:
            return []
        sizes = image_input.get("image_sizes")
        if sizes is None:
            raise ValueError("image_sizes is None: LLaVA-NeXT needs each image's size to lay out its crops")
        sizes = [tuple(int(v) for v in s) for s in sizes.tolist()]
        n = n_visual(self.config)
        layouts = [layout(self.config, h, w) for h, w in sizes]
        crops = [crops_of(self.config, h, w) for h, w in sizes]
        pixel_values = image_input["pixel_values"]
        feature, layer_input = self._feature_layer(torch.cat([p[:c] for p, c in zip(pixel_values, crops)]))
        device = feature.device
        first = [sum(crops[:i]) for i in range(len(crops))]  # each image's first row of `feature`

        # Each image's pieces: the places of its tokens in its block, and their decoder embeddings.
        places: list[list[torch.Tensor]] = [[] for _ in texts]
        embeds: list[list[torch.Tensor]] = [[] for _ in texts]
        newlines: list[torch.Tensor] = []
        place_of: list[torch.Tensor] = []  # per image, [crops, n]: each patch's place in the block, -1 if unshown
        whole: dict[str, list[tuple[int, int]]] = {}  # setting -> (image, crop) of the crops shown in full
        settings = {text: self._setting(text) for text in dict.fromkeys(texts)}
        for image, (tokens, count) in enumerate(zip(layouts, crops)):
            newlines.append((tokens < 0).nonzero()[:, 0])
            places[image].append(newlines[image])
            embeds[image].append(self.image_newline.expand(len(newlines[image]), -1))
            patch_places = torch.full((count * n,), -1, dtype=torch.long)
            patch_places[tokens[tokens >= 0]] = (tokens >= 0).nonzero()[:, 0]
            place_of.append(patch_places.view(count, n))
            for crop in range(count):
                patches = (place_of[image][crop] >= 0).nonzero()[:, 0]
                if len(patches) == n:
                    whole.setdefault(texts[image], []).append((image, crop))
                elif len(patches):  # a tile that unpadding cuts: a unit of the patches shown, alone
                    row = first[image] + crop
                    setting = settings[texts[image]]
                    columns = torch.cat([patches.new_zeros(1), 1 + patches]).to(device)
                    grid = shown_grid(patches, self.config.vision_config.image_size // self.config.vision_config.patch_size)
                    view = PartialCropView(
                        features=feature[row : row + 1, columns[1:]], n_prefix=1,
                        qk=partial(_clip_qk, self.feature_layer, layer_input[row : row + 1]),
                        prefix_features=feature[row : row + 1, 0], project=self.multi_modal_projector, columns=columns, grid=grid,
                    )
                    selection = self._select(setting, view, setting.unit_keep(len(patches), grid))
                    places[image].append(place_of[image][crop, patches[selection.index[0].cpu()]])
                    embeds[image].append(self.multi_modal_projector(selection.states)[0])
        for text, units in whole.items():
            setting = settings[text]
            rows = torch.tensor([first[image] + crop for image, crop in units], device=device)
            selection = self._select(setting, self._view(feature[rows], layer_input[rows]), setting.keep)
            projected = self.multi_modal_projector(selection.states)
            for unit, (image, crop) in enumerate(units):
                places[image].append(place_of[image][crop, selection.index[unit].cpu()])
                embeds[image].append(projected[unit])

        # Each image's tokens in the packing's order (a merged token may share its place with another: the
        # stable sort keeps the method's order, as star.apply's does).
        out, kept = [], []
        for image in range(len(texts)):
            place = torch.cat(places[image])
            order = torch.sort(place, stable=True).indices
            out.append(torch.cat(embeds[image])[order.to(device)])
            kept.append(place[order][~torch.isin(place[order], newlines[image])])
        self.star_kept = kept
        return out
