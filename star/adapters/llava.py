"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP tower with [CLS], an MLP projector, a Llama-style decoder.

Each image is one block of `n_visual` placeholder tokens in the prompt (the processor expands `<image>`),
filled with the projected patch features of `vision_feature_layer`, [CLS] dropped ("default" strategy).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from star.decoder import llama_style_qk
from star.methods.base import VisionView


class LlavaAdapter:
    model_classes = (LlavaForConditionalGeneration,)

    def __init__(self, model: LlavaForConditionalGeneration):
        config = model.config
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(
                f"vision_feature_layer={config.vision_feature_layer!r} (several layers) is not supported: "
                "pruning scores one feature layer, so it must be a single integer"
            )
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} is not supported: "
                "allowed is 'default' ([CLS] dropped), as every llava-hf checkpoint uses"
            )
        self.model = model
        self.vision_tower: nn.Module = model.model.vision_tower
        self.decoder: nn.Module = model.model.language_model
        self.image_token_id: int = config.image_token_id
        vision = config.vision_config
        self.n_visual: int = (vision.image_size // vision.patch_size) ** 2
        num_vision_layers = vision.num_hidden_layers
        # hidden_states[i] is the input of encoder layer i; the feature is the output of layer `feature - 1`.
        self.feature_index = config.vision_feature_layer % (num_vision_layers + 1)
        self.feature_layer = self.vision_tower.vision_model.encoder.layers[self.feature_index - 1]

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.rotary_emb(hidden, position_ids)

    def decoder_qk(self, layer: nn.Module, hidden, position_embeddings, rows):
        return llama_style_qk(layer, hidden, position_embeddings, rows)

    def encode(self, pixel_values: torch.Tensor) -> VisionView:
        dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        feature = out.hidden_states[self.feature_index]
        layer_input = out.hidden_states[self.feature_index - 1]
        return VisionView(
            features=feature[:, 1:],
            n_prefix=1,
            qk=partial(_clip_qk, self.feature_layer, layer_input),
            prefix_features=feature[:, 0],
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)


def _clip_qk(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of a CLIP encoder layer for its input `hidden`: [I, H, T, d] each."""
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    shape = (*hidden.shape[:2], attn.num_heads, attn.head_dim)
    return attn.q_proj(normed).view(shape).transpose(1, 2), attn.k_proj(normed).view(shape).transpose(1, 2)
