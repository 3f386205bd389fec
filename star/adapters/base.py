"""What every adapter hands the pruner: the vision side of one prefill, laid out on the prompt.

The pruner is family-agnostic. An adapter says how a family's image tokens lie in the prompt, which tokens
stage 1 selects among (a "unit": an image, or a LLaVA-NeXT crop), and how the kept ones become decoder
embeddings; the pruner applies the method's plan to each unit and builds the shorter entry frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from star import scoring
from star.methods.base import VisionView

QUERY_CHUNK = 1024  # query rows scored at once: a large image's full attention matrix never exists at once
TEXT = -1  # a prompt token that is no image token
FIXED = -2  # an image token that is always kept and never counted as visual (LLaVA-NeXT's image newline)


@dataclass
class MergedView(VisionView):
    """Units of a tower without [CLS] whose decoder tokens each merge several patches (Qwen's 2 x 2 merger,
    Gemma 3's 4 x 4 average pool): features are the merged tokens, qk the patches' queries and keys in the
    layer's own order, and `token_of[p]` the token that the layer's patch p goes into.

    A token's score is the attention its patches receive (mean over query rows and heads), summed over them.
    """

    token_of: torch.Tensor | None = None

    def received(self) -> torch.Tensor:
        """Attention each token's patches receive, mean over query rows and heads, summed per token: [I, N]."""
        q, k = self.qk()
        total = q.new_zeros(q.shape[0], k.shape[2], dtype=torch.float32)
        for start in range(0, q.shape[2], QUERY_CHUNK):
            total += scoring.attention_probs(q[:, :, start : start + QUERY_CHUNK], k).sum(dim=2).mean(dim=1)
        per_token = total.new_zeros(q.shape[0], self.features.shape[1])
        return per_token.index_add_(1, self.token_of, total / q.shape[2])


@dataclass
class VisionGroup:
    """Units of one size, scored together in one view.

    view: the units' feature layer, features [I, N, D] (I units of N candidate tokens each).
    rows: [I] the prompt each unit belongs to.
    ordinals: [I, N] each candidate's place among the image tokens of its prompt (in prompt order).
    residuals: [I, N, E, D] what the decoder adds onto each candidate's hidden state after each of its first E
    layers (Qwen3-VL's DeepStack features), or None where the family adds nothing.
    """

    view: VisionView
    rows: torch.Tensor
    ordinals: torch.Tensor
    residuals: torch.Tensor | None = None


@dataclass
class Encoded:
    """The vision encoder's output for one batch of prompts.

    groups: the selection units, grouped by size.
    slots: [B, S] for each prompt token: TEXT, FIXED, or its place among the prompt's image tokens (ordinal).
    fixed: the decoder embedding of FIXED tokens, or None where the family has none.
    """

    groups: list[VisionGroup]
    slots: torch.Tensor
    fixed: torch.Tensor | None


class Decoder:
    """The decoder accessors every family shares: its layers, token embeddings and rotary embedding."""

    decoder: nn.Module
    # What the decoder adds onto visual tokens after its first layers (Qwen3-VL's DeepStack): how many layers.
    residual_layers = 0
    # Per-token inputs besides input_ids that the model reads at prefill (Gemma 3's token_type_ids).
    token_inputs: tuple[str, ...] = ()
    # A sliding window some decoder layers attend within, or None (see `Gemma3Adapter`).
    window: int | None = None

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def layer_type(self, index: int) -> str | None:
        """The type of decoder layer `index` where layers differ in mask and rotary table (Gemma 3), else None."""
        return None

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.rotary_emb(hidden, position_ids)


def split_rows(image_tokens: torch.Tensor, per_image: list[int], what: str) -> list[int]:
    """Assign images to prompts in order: prompt r takes images until their tokens match its image tokens.

    image_tokens: [B] image tokens in each prompt; per_image: tokens each image fills. Returns the number of
    images of each prompt, or a ValueError that says what does not match.
    """
    counts, image = [], 0
    for row, need in enumerate(image_tokens.tolist()):
        have, start = 0, image
        while have < need and image < len(per_image):
            have += per_image[image]
            image += 1
        if have != need:
            raise ValueError(
                f"input_ids holds {image_tokens.tolist()} image tokens per prompt but the {len(per_image)} image(s) "
                f"({what}) fill {per_image} tokens each: prompt {row} does not match its images"
            )
        counts.append(image - start)
    if image != len(per_image):
        raise ValueError(
            f"input_ids holds {image_tokens.tolist()} image tokens per prompt, fewer than the {len(per_image)} "
            f"image(s) of {per_image} tokens each ({what}) need"
        )
    return counts


def ordinals(is_image: torch.Tensor) -> torch.Tensor:
    """Each token's place among its prompt's image tokens ([B, S]; TEXT where it is not one)."""
    place = is_image.long().cumsum(dim=1) - 1
    return place.masked_fill(~is_image, TEXT)
