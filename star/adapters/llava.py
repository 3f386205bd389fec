"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP tower with [CLS], an MLP projector, a Llama-style decoder.

Each image is one block of `n_visual` placeholder tokens in the prompt (the processor expands `<image>`),
filled with the projected patch features of `vision_feature_layer`, [CLS] dropped ("default" strategy).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from star import compat
from star.adapters.base import Decoder, Encoded, Layout, VisionGroup, around_image, ordinals, rows_of, split_rows
from star.decoder import llama_style_qk, on_device
from star.methods.base import VisionView


class LlamaDecoder(Decoder):
    """The decoder side shared by LLaVA-style families: a Llama-style decoder with 1-D rotary positions."""

    mrope = False
    has_cls = True
    projects_cls = True

    def decoder_qk(self, layer: nn.Module, hidden, position_embeddings, rows):
        return llama_style_qk(layer, hidden, position_embeddings, rows)

    def prompt_positions(self, inputs: dict, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Positions of the full prompt, [B, S]: the caller's, or what the decoder would use (cache positions)."""
        if inputs.get("position_ids") is not None:
            return inputs["position_ids"]
        batch, length = input_ids.shape
        cache_position = inputs.get("cache_position")
        start = torch.arange(length, device=input_ids.device) if cache_position is None else cache_position
        return start[None].expand(batch, length)

    def decode_positions(self, prompt_positions: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """Positions of new tokens at full-prompt cache positions, where the caller gives none: [B, n]."""
        return cache_position[None].expand(prompt_positions.shape[0], -1)


class LlavaAdapter(LlamaDecoder):
    whole_units = True
    model_classes = (LlavaForConditionalGeneration,)
    budget_note = "tokens per image (576 for a 336 px CLIP tower)"
    vision_inputs = ("pixel_values",)
    select_strategy = "default"  # the vision_feature_select_strategy the family's checkpoints use
    synthetic_tiles = 1  # tower passes the processor makes of the timing image

    def __init__(self, model: LlavaForConditionalGeneration):
        config = model.config
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(
                f"vision_feature_layer={config.vision_feature_layer!r} (several layers) is not supported: "
                "pruning scores one feature layer, so it must be a single integer"
            )
        if config.vision_feature_select_strategy != self.select_strategy:
            raise ValueError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} is not supported: "
                f"allowed is {self.select_strategy!r}, as every {type(model).__name__} checkpoint on the hub uses"
            )
        self.model = model
        self.vision_tower: nn.Module = model.model.vision_tower
        self.decoder: nn.Module = model.model.language_model
        self.image_token_id: int = config.image_token_id
        vision = config.vision_config
        # Tokens per image; `keep` counts per this many tokens.
        self.side: int = vision.image_size // vision.patch_size  # patches per side of the square grid
        self.n_visual: int = self.side**2
        self.budget_unit: int | None = self.n_visual
        num_vision_layers = vision.num_hidden_layers
        # hidden_states[i] is the input of encoder layer i; the feature is the output of layer `feature - 1`.
        self.feature_index = config.vision_feature_layer % (num_vision_layers + 1)
        self.feature_layer = compat.clip_encoder_layers(self.vision_tower)[self.feature_index - 1]

    def encode(self, pixel_values: torch.Tensor, instruction=None) -> VisionView:
        """The feature layer of the CLIP tower for images [I, 3, H, W] (instruction: see `VisionView`)."""
        return self.clip_view(*self.feature_layer_io(pixel_values), instruction)

    def feature_layer_io(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The feature layer's output and input, [I, 1 + N, D] each ([CLS] first)."""
        dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.feature_index], out.hidden_states[self.feature_index - 1]

    def clip_view(self, feature: torch.Tensor, layer_input: torch.Tensor, instruction=None) -> VisionView:
        return VisionView(
            features=feature[:, 1:],
            n_prefix=1,
            qk=partial(_clip_qk, self.feature_layer, layer_input),
            prefix_features=feature[:, 0],
            project=self.project,
            instruction=instruction,
            grid=(self.side, self.side),
        )

    def encode_prompts(self, inputs: dict, input_ids: torch.Tensor, layout: Layout) -> Encoded:
        """The images of a batch of prompts, each one unit of `n_visual` tokens in one block."""
        pixel_values = inputs["pixel_values"]
        per_row = split_rows(layout.image_tokens, [self.n_visual] * pixel_values.shape[0], f"{self.n_visual} tokens each")
        rows = rows_of(per_row)
        device = input_ids.device
        image_in_row = on_device([image for count in per_row for image in range(count)], device)
        places = image_in_row[:, None] * self.n_visual + torch.arange(self.n_visual, device=device)
        view = self.encode(pixel_values, self.instruction(input_ids, rows, layout))
        return Encoded([VisionGroup(view, rows, places)], ordinals(input_ids == self.image_token_id), None)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def synthetic_inputs(self, before: torch.Tensor, after: torch.Tensor, generator: torch.Generator) -> dict:
        """Prompts of text [B, b] and [B, a] around one random image, for timing: `synthetic_tiles` tiles of the
        tower's size, one block of their tokens."""
        size = self.model.config.vision_config.image_size
        side = size[0] if isinstance(size, (list, tuple)) else size  # InternViT's is (height, width)
        pixels = torch.randn(before.shape[0] * self.synthetic_tiles, 3, side, side, generator=generator)
        block = [self.image_token_id] * (self.n_visual * self.synthetic_tiles)
        return {**around_image(before, after, block), "pixel_values": pixels}


def _clip_qk(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of a CLIP encoder layer for its input `hidden`: [I, H, T, d] each."""
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    shape = (*hidden.shape[:2], attn.num_heads, attn.head_dim)
    return attn.q_proj(normed).view(shape).transpose(1, 2), attn.k_proj(normed).view(shape).transpose(1, 2)
