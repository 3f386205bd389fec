"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): LLaVA-1.5's parts, with any-resolution images.

Each image is cut into crops the CLIP tower sees at its own resolution: the whole image resized (the base
crop) and the tiles of a grid chosen from `image_grid_pinpoints`. The prompt holds the base crop's patches,
then the tiles' patches as one picture, row by row, unpadded to the image's aspect ratio, each row ended by
the learned `image_newline` token. Stage 1 selects within each crop (the unit): a tile that unpadding cuts
shows only some of its patches, and only those are candidates. The newline tokens always stay and are never
counted as visual tokens. `keep` counts per 576-token crop (a fraction of each crop); the decoder stages
are LLaVA-1.5's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from star import scoring
from star.adapters.base import FIXED, Encoded, Layout, VisionGroup, around_image, ordinals, split_rows
from star.decoder import on_device
from star.adapters.llava import LlavaAdapter, _clip_qk
from star.methods.base import VisionView


@dataclass
class PartialCropView(VisionView):
    """A crop of which the prompt shows only some patches: the attention is the whole crop's, read at the
    columns of its prefix and of the shown patches, so a method ranks those and nothing else."""

    columns: torch.Tensor | None = None  # [n_prefix + N] key columns of the prefix and of the shown patches

    @cached_property
    def attention(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k = self.qk()
        return scoring.attention_probs(q, k)[..., self.columns], q, k[:, :, self.columns]


class LlavaNextAdapter(LlavaAdapter):
    model_classes = (LlavaNextForConditionalGeneration,)
    budget_note = "tokens per 576-token crop (base image and tiles); newline tokens always stay"
    whole_units = False  # crops shown in part, and newline tokens
    vision_inputs = ("pixel_values", "image_sizes")

    def __init__(self, model: LlavaNextForConditionalGeneration):
        super().__init__(model)
        self.newline = model.model.image_newline

    def layouts(self, crops: list[int], image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """For each image, what each of its prompt tokens is: crop * n_visual + patch, or -1 for a newline.

        The model's own packing (reshape, unpad, newlines) applied to patch numbers instead of features.
        """
        numbers = [torch.arange(c * self.n_visual, dtype=torch.float64).view(c, self.n_visual, 1) for c in crops]
        newline = torch.tensor([-1.0], dtype=torch.float64)
        packed, _ = self.model.model.pack_image_features(numbers, image_sizes.cpu(), "default", image_newline=newline)
        return [p[:, 0].long() for p in packed]

    def encode_prompts(self, inputs: dict, input_ids: torch.Tensor, layout: Layout) -> Encoded:
        """The crops of a batch of prompts, each one unit; crops the prompt shows in full are scored together."""
        pixel_values, image_sizes = inputs["pixel_values"], inputs.get("image_sizes")
        if image_sizes is None:
            raise ValueError("image_sizes is None: LLaVA-NeXT needs each image's size to lay out its crops")
        config = self.model.config
        # Each image's crops and their unpadded packing depend on its size: the family's own read back from the
        # device (docs/results.md, "Host syncs per prefill").
        crops = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes
        ]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([p[:c] for p, c in zip(pixel_values, crops)])
        layouts = self.layouts(crops, image_sizes)
        is_image = input_ids == self.image_token_id
        per_row = split_rows(layout.image_tokens, [len(l) for l in layouts], "crops and newlines")
        device = input_ids.device
        n = self.n_visual

        # Each crop's patches: their places among the row's image tokens (-1 where unpadding cut them).
        place_of, rows = [], []
        is_newline = torch.zeros(input_ids.shape[0], max(layout.image_tokens) + 1, dtype=torch.bool)
        image = 0
        for row, count in enumerate(per_row):
            offset = 0
            for packing, c in zip(layouts[image : image + count], crops[image : image + count]):
                shown = packing >= 0
                places = torch.full((c * n,), -1, dtype=torch.long)
                places[packing[shown]] = shown.nonzero()[:, 0] + offset
                place_of.append(places.view(c, n))
                rows.extend([row] * c)
                is_newline[row, offset : offset + len(packing)] = ~shown
                offset += len(packing)
            image += count
        slots = ordinals(is_image)
        newline = is_newline.to(device).gather(1, slots.clamp_min(0)) & (slots >= 0)
        slots = slots.masked_fill(newline, FIXED)

        feature, layer_input = self.feature_layer_io(pixel_values)
        place_of = torch.cat(place_of)  # on the host, where the crops' shapes are decided
        whole = (place_of >= 0).all(dim=1).nonzero()[:, 0].tolist()
        partial_crops = ((place_of >= 0).any(dim=1) & ~(place_of >= 0).all(dim=1)).nonzero()[:, 0].tolist()  # a crop shown not at all is no unit
        groups = []
        if whole:
            index = on_device(whole, device)
            whole_rows = [rows[crop] for crop in whole]
            view = self.clip_view(feature[index], layer_input[index], self.instruction(input_ids, whole_rows, layout))
            groups.append(VisionGroup(view, whole_rows, place_of[whole].to(device)))
        for crop in partial_crops:
            shown_host = (place_of[crop] >= 0).nonzero()[:, 0]
            shown = shown_host.to(device)
            view = PartialCropView(
                features=feature[crop : crop + 1, 1 + shown],
                n_prefix=1,
                qk=partial(_clip_qk, self.feature_layer, layer_input[crop : crop + 1]),
                prefix_features=feature[crop : crop + 1, 0],
                project=self.project,
                instruction=self.instruction(input_ids, [rows[crop]], layout),
                columns=torch.cat([shown.new_zeros(1), 1 + shown]),
                grid=shown_grid(shown_host, self.side),
            )
            groups.append(VisionGroup(view, [rows[crop]], place_of[crop : crop + 1, shown_host].to(device)))
        return Encoded(groups, slots, self.newline)

    def synthetic_inputs(self, before: torch.Tensor, after: torch.Tensor, generator: torch.Generator) -> dict:
        """Prompts of text around one random image of the largest pinpoint (672 x 672 for LLaVA-NeXT-7B: the base
        crop and a 2 x 2 grid of tiles)."""
        size = max(self.model.config.image_grid_pinpoints, key=lambda hw: hw[0] * hw[1])
        return anyres_inputs(self, size, before, after, generator)


def shown_grid(shown: torch.Tensor, side: int) -> tuple[int, int]:
    """The (rows, columns) of the patches a crop shows: unpadding cuts whole rows or whole columns, so they are a
    rectangle of the crop's side x side grid, listed in row-major order."""
    rows = len(torch.unique(shown // side))
    return rows, len(shown) // rows


def anyres_inputs(adapter, size: list[int], before: torch.Tensor, after: torch.Tensor, generator: torch.Generator) -> dict:
    """Prompts of text around one random image of `size` (height, width) for an any-resolution family (LLaVA-NeXT,
    LLaVA-OneVision): its crops stacked as the processor stacks them, its image tokens counted by the model's own
    packing (the adapter's `layouts`)."""
    config = adapter.model.config
    side = config.vision_config.image_size
    crops = image_size_to_num_patches(size, config.image_grid_pinpoints, side)
    batch = before.shape[0]
    tokens = len(adapter.layouts([crops], torch.tensor([size]))[0])
    pixels = torch.randn(batch, crops, 3, side, side, generator=generator)
    block = [adapter.image_token_id] * tokens
    return {**around_image(before, after, block), "pixel_values": pixels, "image_sizes": torch.tensor([size] * batch)}
