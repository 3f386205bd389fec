"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

A vision tower without [CLS] that sees each image at its own resolution, a patch merger that fuses each
2 x 2 group of neighbouring patches into one decoder token (the merger is the projector), and a Qwen2
decoder with 3-D rotary positions (M-RoPE: temporal, height, width). Each image is one block of
t * h * w / 4 placeholder tokens in the prompt. Qwen2.5-VL's tower attends within windows except in the
layers of `fullatt_block_indexes`, and runs its blocks on patches reordered window by window.

Stage 1 (the unit is an image): a token's score is the attention its patches receive in the tower's last
full-attention layer (the mean over that image's query rows and heads), summed over the patches the merger
fuses into it; it is recomputed from that layer's queries and keys, so the tower keeps its fast attention.
The kept tokens keep their original 3-D positions in every layer and at every decode step.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from star import compat
from star.adapters.base import Decoder, Encoded, Layout, MergedView, VisionGroup, around_image, ordinals, split_rows


class Qwen2VLAdapter(Decoder):
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    budget_note = "tokens per image (each image its own size; an int above an image's tokens is refused)"
    vision_inputs = ("pixel_values", "image_grid_thw")
    mrope = True
    resizable = True
    has_cls = False
    n_visual = None  # images differ in size: plans are made per image
    budget_unit = None  # an int `keep` counts tokens per image
    sizes_note = "t * h * w / merge_size**2 tokens each"  # how an image's tokens are counted, for split_rows' errors
    synthetic_patches = 48  # per side of the timing image: 672 px at 14 px patches, 576 merged tokens as LLaVA-1.5's

    def __init__(self, model: Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration):
        self.model = model
        self.visual: nn.Module = model.model.visual
        self.decoder: nn.Module = model.model.language_model
        self.image_token_id: int = model.config.image_token_id
        self.merge_unit = self.visual.spatial_merge_size**2
        full = getattr(self.visual, "fullatt_block_indexes", None)
        self.score_block: nn.Module = self.visual.blocks[max(full) if full else -1]
        self._vision_rotary = compat.qwen_vision_rotary(self.score_block)

    def decoder_qk(self, layer: nn.Module, hidden, position_embeddings, rows):
        return compat.qwen_decoder_qk(layer, hidden, position_embeddings, rows)

    def prompt_positions(self, inputs: dict, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """3-D positions of the full prompt, [3, B, S] (generate() gives [4, B, S], text positions first)."""
        return compat.qwen_prompt_positions(self.model, inputs, input_ids, mask)

    def grid_positions(self, input_ids: torch.Tensor, mask: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """3-D positions, [3, B, S], of prompts whose images are `grids` of merged tokens (rows, columns), in order:
        what the model's `get_rope_index` gives a prompt of images that small (pool's grids)."""
        merge = self.visual.spatial_merge_size
        thw = torch.tensor([[1, merge * rows, merge * cols] for rows, cols in grids], device=input_ids.device)
        return compat.qwen_grid_positions(self.model, input_ids, mask, thw, self.image_token_id)

    def decode_positions(self, prompt_positions: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """New tokens continue after the prompt's largest position, on all three axes: [3, B, n]."""
        rope = prompt_positions[-3:]
        delta = rope.amax(dim=(0, 2)) + 1 - rope.shape[-1]
        return (cache_position[None, None, :] + delta[None, :, None]).expand(3, -1, -1)

    def encode_prompts(self, inputs: dict, input_ids: torch.Tensor, layout: Layout) -> Encoded:
        """The images of a batch of prompts, each one unit of its own size."""
        if inputs.get("pixel_values_videos") is not None:
            raise ValueError("pixel_values_videos came with images: video tokens are not pruned, pass images alone")
        grid = inputs["image_grid_thw"]
        # Images of different sizes: their token counts and grids came with the layout; the tower's bounds below
        # are this family's own read back from the device (docs/results.md, "Host syncs per prefill").
        sizes, grids = layout.image_sizes, layout.image_grids
        is_image = input_ids == self.image_token_id
        per_row = split_rows(layout.image_tokens, sizes, self.sizes_note)

        layer: dict[str, object] = {}

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            layer.update(hidden=args[0], cu_seqlens=kwargs["cu_seqlens"], rotary=kwargs["position_embeddings"])

        handle = self.score_block.register_forward_pre_hook(record, with_kwargs=True)
        try:
            tokens, residuals = self.tower(inputs["pixel_values"].type(self.visual.dtype), grid)
        finally:
            handle.remove()
        order = compat.window_order(self.visual, grid).to(input_ids.device)

        device = input_ids.device
        groups, token_start, image = [], 0, 0
        bounds = layer["cu_seqlens"].tolist()
        for row, count in enumerate(per_row):
            place = 0
            for _ in range(count):
                n = sizes[image]
                qk = partial(self._patch_qk, layer["hidden"], layer["rotary"], bounds[image], bounds[image + 1])
                view = MergedView(
                    features=tokens[None, token_start : token_start + n],
                    n_prefix=0,
                    qk=qk,
                    instruction=self.instruction(input_ids, [row], layout),
                    token_of=(order[token_start : token_start + n] - token_start).repeat_interleave(self.merge_unit),
                    grid=grids[image],
                )
                places = torch.arange(place, place + n, device=device)[None]
                extra = None if residuals is None else residuals[None, token_start : token_start + n]
                groups.append(VisionGroup(view, [row], places, extra))
                token_start += n
                place += n
                image += 1
        return Encoded(groups, ordinals(is_image), None)

    def image_sizes(self, inputs: dict) -> torch.Tensor:
        """Each image's merged tokens, rows and columns, [I, 3]: its tokens lie in row-major order of its (h, w)
        grid; an image of several frames (t > 1) has no grid of its own (0, 0)."""
        grid = inputs.get("image_grid_thw")
        if grid is None:
            raise ValueError("image_grid_thw is None: Qwen2-VL needs each image's patch grid")
        frames, height, width = grid.unbind(dim=-1)
        merge = self.visual.spatial_merge_size
        single = (frames == 1).long()
        return torch.stack([grid.prod(dim=-1) // self.merge_unit, height // merge * single, width // merge * single], dim=-1)

    def tower(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged tokens of every image, [T, D]; Qwen2-VL's decoder takes nothing else from the tower."""
        return compat.merged_tokens(self.visual(pixel_values, grid_thw=grid)), None

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The merger already projected the tokens into the decoder's space."""
        return features

    def synthetic_inputs(self, before: torch.Tensor, after: torch.Tensor, generator: torch.Generator, side: int | None = None) -> dict:
        """Prompts of text around one random square image of `side` patches a side (default `synthetic_patches`; a
        multiple of the merge size), between its vision start and end tokens."""
        config, vision = self.model.config, self.model.config.vision_config
        side = side or self.synthetic_patches
        batch = before.shape[0]
        block = [config.vision_start_token_id] + [self.image_token_id] * (side * side // self.merge_unit) + [config.vision_end_token_id]
        prompt = around_image(before, after, block)
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.randn(batch * side * side, patch, generator=generator)
        grid = torch.tensor([[1, side, side]] * batch)
        return {**prompt, "pixel_values": pixels, "image_grid_thw": grid, **compat.qwen_token_types(prompt["input_ids"], self.image_token_id)}

    def _patch_qk(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], start: int, end: int):
        """Queries and keys of the score layer for one image's patches (start:end), [1, H, T, d] each."""
        attn = self.score_block.attn
        normed = self.score_block.norm1(hidden[start:end])
        q, k, _ = attn.qkv(normed).reshape(end - start, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = rotary
        q, k = self._vision_rotary(q, k, cos[start:end], sin[start:end])
        return q.transpose(0, 1)[None], k.transpose(0, 1)[None]
