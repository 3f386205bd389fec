"""InternVL (`InternVLForConditionalGeneration`): an InternViT tower with [CLS], pixel shuffle, an MLP projector and
a Qwen2-style decoder with 1-D positions.

The image processor cuts each image into tiles at the tower's resolution (448 px), with a thumbnail of the
whole image last when there are several; each tile, and each video frame, is one pass of the tower and one
block of 256 placeholder tokens in the prompt (between `<img>` and `</img>`). The model fills the placeholders
tile after tile and knows no image boundaries, so the tile is the unit of stage 1 and of `keep`: keep=64
keeps 64 of each tile's 256 tokens.

Stage 1: pixel shuffle concatenates each 2 x 2 block of patches ([CLS] dropped) into one decoder token. A
token's score is the attention its four patches receive in the tower's last layer (the mean over all query
rows, [CLS] included, and heads, summed over the four); FasterVLM's is the [CLS] row's attention to them,
summed alike. VisionZip keeps the [CLS] token itself as a token, and InternVL's projector takes only merged
patch blocks, so it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration

from star import scoring
from star.adapters.llava import LlavaAdapter
from star.methods.base import VisionView


TILES_AT_ONCE = 8  # tiles whose attention is computed together: a batch's whole attention never exists at once


@dataclass
class ShuffledView(VisionView):
    """Tiles whose decoder tokens each merge several patches: qk covers [CLS] and every patch, and
    `sources[t]` lists the patches token t merges; a token receives what its patches receive."""

    sources: torch.Tensor | None = None  # [N, 4] patch numbers (0-based, [CLS] not counted)

    @cached_property
    def patch_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per patch, [I, P] each: the attention it receives (mean over all query rows and heads) and the
        [CLS] row's attention to it (mean over heads)."""
        q, k = self.qk()
        received, cls_row = [], []
        for start in range(0, q.shape[0], TILES_AT_ONCE):
            probs = scoring.attention_probs(q[start : start + TILES_AT_ONCE], k[start : start + TILES_AT_ONCE])
            received.append(scoring.received_attention(probs)[:, 1:])
            cls_row.append(probs[:, :, 0, 1:].mean(dim=1))
        return torch.cat(received), torch.cat(cls_row)

    def received(self) -> torch.Tensor:
        """Attention each token's patches receive, summed per token: [I, N]."""
        return self.patch_scores[0][:, self.sources].sum(dim=-1)

    def cls_attention(self) -> torch.Tensor:
        """The [CLS] row's attention to each token's patches, summed per token: [I, N]."""
        return self.patch_scores[1][:, self.sources].sum(dim=-1)


class InternVLAdapter(LlavaAdapter):
    model_classes = (InternVLForConditionalGeneration,)
    vision_inputs = ("pixel_values",)
    projects_cls = False  # the projector takes 2 x 2 patch blocks only
    budget_note = "tokens per 256-token tile (every tile, the thumbnail and each video frame)"
    # The timing image: 1344 x 1792 px, which the processor cuts into its most tiles at its defaults (max_patches=12),
    # 3 x 4 of 448 px, and the thumbnail (star/configs/internvl3-8b.json's max_crops). Its <img> and </img> are
    # plain text to the model, ids the config does not name: the random text stands in for them.
    synthetic_tiles = 13

    def __init__(self, model: InternVLForConditionalGeneration):
        config = model.config
        if config.vision_feature_layer != -1:
            raise ValueError(
                f"vision_feature_layer={config.vision_feature_layer!r} is not supported: allowed is -1 (the tower's "
                "last layer), as every InternVL checkpoint uses"
            )
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} is not supported: allowed "
                "is 'default' ([CLS] dropped before pixel shuffle), as every InternVL checkpoint uses"
            )
        self.model = model
        self.vision_tower: nn.Module = model.model.vision_tower
        self.decoder: nn.Module = model.model.language_model
        attention = self.decoder.layers[0].self_attn
        if hasattr(attention, "q_norm"):
            raise ValueError(
                f"a decoder whose attention normalizes queries and keys ({type(attention).__name__}.q_norm) is not "
                "supported yet: its decoder-stage scores would miss that norm"
            )
        self.image_token_id: int = config.image_token_id
        self.score_layer: nn.Module = self.vision_tower.encoder.layer[-1]
        size = config.vision_config.image_size
        patch = config.vision_config.patch_size
        self.side = (size[0] if isinstance(size, (list, tuple)) else size) // (patch[0] if isinstance(patch, (list, tuple)) else patch)
        self.ratio: float = config.downsample_ratio
        # The patches each token merges: the model's own pixel shuffle applied to patch numbers.
        numbers = torch.arange(self.side**2, dtype=torch.float64).view(1, self.side, self.side, 1)
        self.sources = model.model.pixel_shuffle(numbers, scale_factor=self.ratio).reshape(-1, round(1 / self.ratio**2)).long()
        self.n_visual: int = self.sources.shape[0]
        self.budget_unit: int | None = self.n_visual

    def encode(self, pixel_values: torch.Tensor, instruction=None) -> VisionView:
        """Tiles [I, 3, H, W]: their shuffled patch blocks before the projector, [I, N, 4 * C]."""
        recorded: list[torch.Tensor] = []

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            recorded.append(args[0] if args else kwargs["hidden_states"])

        handle = self.score_layer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            dtype = next(self.vision_tower.parameters()).dtype
            feature = self.vision_tower(pixel_values=pixel_values.to(dtype)).last_hidden_state
        finally:
            handle.remove()
        patches = feature[:, 1:].reshape(feature.shape[0], self.side, self.side, -1)
        shuffled = self.model.model.pixel_shuffle(patches, scale_factor=self.ratio)
        return ShuffledView(
            features=shuffled.reshape(feature.shape[0], self.n_visual, -1),
            n_prefix=1,
            qk=partial(_internvl_qk, self.score_layer, recorded[0]),
            sources=self.sources.to(feature.device),
            project=self.project,
            instruction=instruction,
            grid=(shuffled.shape[1], shuffled.shape[2]),
        )


def _internvl_qk(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of an InternViT layer for its input `hidden`: [I, H, T, d] each (its q/k norms act on
    the whole width, before the split into heads)."""
    attn = layer.attention
    normed = layer.layernorm_before(hidden)
    shape = (*hidden.shape[:2], attn.num_heads, attn.head_dim)
    q = attn.q_norm(attn.q_proj(normed)).view(shape).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(normed)).view(shape).transpose(1, 2)
    return q, k
