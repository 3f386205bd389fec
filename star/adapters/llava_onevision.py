"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's any-resolution layout with a SigLIP
tower (no [CLS]; every token of the feature layer is a patch) and a Qwen2 decoder.

An image alone in its prompt is encoded as a base crop (the whole image at the tower's resolution, 729 patches
at 384 px) and the tiles of a grid chosen from `image_grid_pinpoints`. The prompt holds the base crop's
tokens, then the tiles as one picture, row by row, unpadded to the image's aspect ratio, each row ended by the
learned `image_newline` token; where that picture exceeds `anyres_max_9`'s area (9 crops, by more than
1.1 x 1.1), the model resizes it bilinearly, so its tokens are mixtures of neighbouring patches. An image in a
prompt with several images (`batch_num_images` > 1) is its base crop alone, followed by one newline.

Units of stage 1: each base crop, and each image's tile grid as a whole (after unpadding and resizing, a
token need not belong to one tile). `keep` counts per 729-token crop: a base crop keeps `keep`, a tile grid of
n tokens keeps keep * n / 729 (a float `keep` is a fraction of each unit). The newline tokens always stay and
are never counted. A token's score is the attention its source patches receive in the feature layer (mean over
that crop's query rows and heads), mapped onto the tokens by the model's own packing: one patch for the base
crop and an unresized grid, the bilinear mixture of four for a resized one. With no [CLS], FasterVLM and
VisionZip are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from star import scoring
from star.adapters.base import FIXED, Encoded, Layout, VisionGroup, ordinals, split_rows
from star.adapters.llava import LlavaAdapter, _clip_qk
from star.adapters.llava_next import anyres_inputs
from star.methods.base import VisionView


@dataclass
class TileGridView(VisionView):
    """One image's tile grid: qk gives the tiles' queries and keys, [tiles, H, P, d]; `to_tokens` maps a map
    over the tiles' patches [tiles, P] onto the grid's tokens [1, N], as the model packs its features."""

    to_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None

    def received(self) -> torch.Tensor:
        """Attention each token's source patches receive (mean over each tile's query rows and heads): [1, N]."""
        q, k = self.qk()
        return self.to_tokens(scoring.received_attention(scoring.attention_probs(q, k)))


class LlavaOnevisionAdapter(LlavaAdapter):
    model_classes = (LlavaOnevisionForConditionalGeneration,)
    vision_inputs = ("pixel_values", "image_sizes", "batch_num_images")
    select_strategy = "full"
    has_cls = projects_cls = False
    budget_note = "tokens per 729-token crop (the tile grid keeps its share); newline tokens always stay"
    whole_units = False  # a tile grid kept in its share, and newline tokens

    def __init__(self, model: LlavaOnevisionForConditionalGeneration):
        super().__init__(model)
        self.newline = model.model.image_newline

    def pack(self, crops: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor | None) -> list[torch.Tensor]:
        """The model's own packing of per-crop maps [c, P, D] into each image's token sequence [L, D]."""
        packed, _ = self.model.model.pack_image_features(
            crops, image_sizes, image_newline=newline, vision_aspect_ratio=self.model.config.vision_aspect_ratio
        )
        return packed

    def layouts(self, crops: list[int], image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """For each image, what each of its prompt tokens is: -1 for a newline, else a patch number (a mixture of
        neighbouring ones where the model resizes the grid). The model's own packing applied to patch numbers."""
        numbers = torch.arange(sum(crops) * self.n_visual, dtype=torch.float64).view(-1, self.n_visual, 1)
        return [p[:, 0] for p in self.pack(list(numbers.split(crops)), image_sizes.cpu(), torch.tensor([-1.0], dtype=torch.float64))]

    def grid_tokens(self, per_patch: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        """A map over one image's tiles [tiles, P] packed onto its grid's tokens [1, N] (unpadded, resized)."""
        base = per_patch.new_zeros(1, per_patch.shape[1])  # a stand-in: packing puts the base crop first
        packed = self.pack([torch.cat([base, per_patch])[..., None]], image_size[None], None)[0]
        return packed[self.n_visual :, 0][None]

    def encode_prompts(self, inputs: dict, input_ids: torch.Tensor, layout: Layout) -> Encoded:
        """Base crops (scored together) and tile grids (one unit each) of a batch of prompts."""
        if inputs.get("pixel_values_videos") is not None:
            raise ValueError("pixel_values_videos came with images: video tokens are not pruned, pass images alone")
        pixel_values, image_sizes = inputs["pixel_values"], inputs.get("image_sizes")
        if image_sizes is None:
            raise ValueError("image_sizes is None: LLaVA-OneVision needs each image's size to lay out its crops")
        config = self.model.config
        counts = inputs.get("batch_num_images")
        tiled = [True] * len(image_sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        crops = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if t else 1
            for size, t in zip(image_sizes, tiled)
        ]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([p[:c] for p, c in zip(pixel_values, crops)])
        layouts = self.layouts(crops, image_sizes)
        is_image = input_ids == self.image_token_id
        per_row = split_rows(layout.image_tokens, [len(l) for l in layouts], "crops and newlines")
        device = input_ids.device

        feature, layer_input = self.feature_layer_io(pixel_values)
        tokens = self.pack(list(self.model.model.multi_modal_projector(feature).split(crops)), image_sizes, None)
        first_crop = torch.tensor([0, *crops[:-1]]).cumsum(0).tolist()
        is_newline = torch.zeros(input_ids.shape[0], max(layout.image_tokens) + 1, dtype=torch.bool)
        base_rows, base_places, groups, image = [], [], [], 0
        for row, count in enumerate(per_row):
            offset = 0
            for _ in range(count):
                packing, c = layouts[image], crops[image]
                shown = (packing >= 0).nonzero()[:, 0].to(device) + offset
                is_newline[row, offset : offset + len(packing)] = packing < 0
                base_rows.append(row)
                base_places.append(shown[: self.n_visual])
                if c > 1:
                    tiles = slice(first_crop[image] + 1, first_crop[image] + c)
                    view = TileGridView(
                        features=tokens[image][None, self.n_visual :],
                        n_prefix=0,
                        qk=partial(_clip_qk, self.feature_layer, layer_input[tiles]),
                        to_tokens=partial(self.grid_tokens, image_size=image_sizes[image]),
                        instruction=self.instruction(input_ids, [row], layout),
                        grid=_picture_grid(packing[self.n_visual :]),
                    )
                    groups.append(VisionGroup(view, [row], shown[None, self.n_visual :]))
                offset += len(packing)
                image += 1
        bases = torch.tensor(first_crop, device=device)
        base_view = VisionView(
            features=torch.stack([t[: self.n_visual] for t in tokens]),
            n_prefix=0,
            qk=partial(_clip_qk, self.feature_layer, layer_input[bases]),
            instruction=self.instruction(input_ids, base_rows, layout),
            grid=(self.side, self.side),
        )
        groups.insert(0, VisionGroup(base_view, base_rows, torch.stack(base_places)))
        slots = ordinals(is_image)
        newline = is_newline.to(device).gather(1, slots.clamp_min(0)) & (slots >= 0)
        return Encoded(groups, slots.masked_fill(newline, FIXED), self.newline)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The units' tokens are already projected (and resized) by the model's own packing."""
        return features

    def synthetic_inputs(self, before: torch.Tensor, after: torch.Tensor, generator: torch.Generator) -> dict:
        """Prompts of text around one random square image alone in its prompt, of the largest square tile grid
        `anyres_max_N` takes without resizing it: 3 x 3 tiles for anyres_max_9, 1152 x 1152 px, 10 crops and 81
        newlines (star/configs/llava-onevision-7b.json's image)."""
        config = self.model.config
        tiles = math.isqrt(int(config.vision_aspect_ratio.removeprefix("anyres_max_")))
        side = tiles * config.vision_config.image_size
        inputs = anyres_inputs(self, [side, side], before, after, generator)
        return {**inputs, "batch_num_images": torch.ones(before.shape[0], dtype=torch.long)}


def _picture_grid(packing: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of a tile grid's tokens from its packing (-1 for the newline that ends each row)."""
    rows = int((packing < 0).sum())
    return rows, (len(packing) - rows) // rows
