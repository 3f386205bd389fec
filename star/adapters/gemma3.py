"""Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP tower without [CLS], an average pool, a Gemma 3 decoder.

The tower sees each image (and each pan-and-scan crop, which the processor makes an image of its own) at one
resolution, 64 x 64 patches at 896 px; the projector averages each 4 x 4 block of patches into one token, so
every image is one block of `mm_tokens_per_image` (256) tokens between start- and end-of-image tokens. `keep`
counts tokens per image. The decoder attends bidirectionally inside each image block (from `token_type_ids`),
alternates sliding-window and global layers with a mask and a rotary embedding of each type, scales its
attention by `query_pre_attn_scalar` and normalises each head's queries and keys.

Stage 1 (the unit is an image): a token's score is the attention its 16 patches receive in the tower's last
layer (whose output the projector pools), mean over query rows and heads, summed over the 16. Only the kept
tokens are normalised and projected; each keeps its place in the image block, so the kept tokens of an image
still attend to each other both ways. A decoder stage cuts every layer type's mask and rotary embedding alike.
While the sequence fits the sliding window (1024 tokens in every Gemma 3 checkpoint) a sliding layer sees what
a global one sees; a decoder stage refuses a longer one rather than guess how a window over dropped tokens
should count (stage 1 alone has no such limit: the decoder then runs the shorter prompt as it is).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers import Gemma3ForConditionalGeneration

from star import compat
from star.adapters.base import Encoded, Layout, MergedView, VisionGroup, around_image, ordinals, rows_of, split_rows
from star.adapters.llava import LlamaDecoder, _clip_qk
from star.decoder import llama_style_qk, on_device


class GemmaDecoder(LlamaDecoder):
    """The decoder side Gemma 3 and Gemma 4 share: sliding and global layers, each type with its own mask and
    rotary table; attention scaled by the layer's own `scaling` after per-head q/k norms; image tokens embedded
    as `embed_fill` (their id may lie outside the vocabulary), as the model does, and overwritten."""

    has_cls = False
    embed_fill = 0

    def use_decoder(self, text) -> None:
        """The decoder's layer types and sliding window, from its text config."""
        self.layer_types: list[str] = list(text.layer_types)
        self.window: int | None = text.sliding_window if "sliding_attention" in self.layer_types else None

    def layer_type(self, index: int) -> str:
        return self.layer_types[index]

    def decoder_qk(self, layer: nn.Module, hidden, position_embeddings, rows):
        """Llama's queries and keys, with the queries rescaled so that softmax(q k^T / sqrt(d)) is the
        layer's own softmax(q k^T * scaling) (Gemma 3: query_pre_attn_scalar ** -0.5; Gemma 4: 1)."""
        q, k = llama_style_qk(layer, hidden, position_embeddings, rows)
        return q * (layer.self_attn.scaling * q.shape[-1] ** 0.5), k

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (scaled, as the decoder scales them), image tokens as `embed_fill`."""
        return self.decoder.embed_tokens(input_ids.masked_fill(input_ids == self.image_token_id, self.embed_fill))

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return compat.gemma_rotary(self.decoder, hidden, position_ids, layer_type)


class Gemma3Adapter(GemmaDecoder):
    whole_units = True
    model_classes = (Gemma3ForConditionalGeneration,)
    budget_note = "tokens per image or pan-and-scan crop (256); decoder stages within the 1024-token sliding window"
    vision_inputs = ("pixel_values",)
    token_inputs = ("token_type_ids",)

    def __init__(self, model: Gemma3ForConditionalGeneration):
        config = model.config
        text = config.get_text_config()
        if text.attn_logit_softcapping is not None:
            raise ValueError(
                f"attn_logit_softcapping={text.attn_logit_softcapping} is not supported: decoder scores are "
                "recomputed as a plain softmax, which a soft-capped attention is not (no Gemma 3 checkpoint caps)"
            )
        self.model = model
        self.vision_tower: nn.Module = model.model.vision_tower
        self.projector: nn.Module = model.model.multi_modal_projector
        self.decoder: nn.Module = model.model.language_model
        self.image_token_id: int = config.image_token_id
        self.n_visual: int = config.mm_tokens_per_image
        self.budget_unit: int | None = self.n_visual
        self.use_decoder(text)
        self.score_layer = compat.clip_encoder_layers(self.vision_tower)[-1]
        # Patch p of the tower's row-major grid goes into pooled token token_of[p].
        side, kernel = self.projector.patches_per_image, self.projector.kernel_size
        rows = torch.arange(side) // kernel
        self.pooled_side = side // kernel  # the pooled tokens' square grid
        self.token_of = (rows[:, None] * self.pooled_side + rows[None, :]).flatten()

    def encode_prompts(self, inputs: dict, input_ids: torch.Tensor, layout: Layout) -> Encoded:
        """The images of a batch of prompts, each one unit of `n_visual` pooled tokens in one block."""
        pixel_values = inputs["pixel_values"]
        per_row = split_rows(layout.image_tokens, [self.n_visual] * pixel_values.shape[0], f"{self.n_visual} tokens each")
        rows = rows_of(per_row)
        dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        device = input_ids.device
        view = MergedView(
            features=self.pool(out.last_hidden_state),
            n_prefix=0,
            qk=partial(_clip_qk, self.score_layer, out.hidden_states[-2]),
            token_of=on_device(self.token_of, device),
            project=self.project,
            instruction=self.instruction(input_ids, rows, layout),
            grid=(self.pooled_side, self.pooled_side),
        )
        image_in_row = on_device([image for count in per_row for image in range(count)], device)
        places = image_in_row[:, None] * self.n_visual + torch.arange(self.n_visual, device=device)
        return Encoded([VisionGroup(view, rows, places)], ordinals(input_ids == self.image_token_id), None)

    def synthetic_inputs(self, before: torch.Tensor, after: torch.Tensor, generator: torch.Generator) -> dict:
        """Prompts of text around one random image of the tower's size (896 px for Gemma 3), its `n_visual` tokens
        between start- and end-of-image tokens and marked in token_type_ids, as the processor does."""
        config = self.model.config
        side = config.vision_config.image_size
        pixels = torch.randn(before.shape[0], 3, side, side, generator=generator)
        block = [config.boi_token_index] + [self.image_token_id] * self.n_visual + [config.eoi_token_index]
        prompt = around_image(before, after, block)
        return {**prompt, "pixel_values": pixels, "token_type_ids": (prompt["input_ids"] == self.image_token_id).long()}

    def pool(self, patches: torch.Tensor) -> torch.Tensor:
        """The projector's average pool: [I, side * side, D] patches to [I, N, D] tokens, row by row."""
        side = self.projector.patches_per_image
        grid = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)
        return self.projector.avg_pool(grid).flatten(2).transpose(1, 2)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector after its pool: normalise, then project into the decoder's space."""
        normed = self.projector.mm_soft_emb_norm(features)
        return torch.matmul(normed, self.projector.mm_input_projection_weight).type_as(features)
