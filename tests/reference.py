"""Independent references for the pruned model: plain forward passes built from the model's own modules.

They share no code with `star`: the kept sets come from the pruner's stats, everything else (embedding,
masks, positions, the layer loop) is computed here the straightforward way, one prompt at a time.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from conftest import IMAGE_TOKEN, N_VISUAL


def image_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected patch features of every image, [I, N, D], as the unpatched model computes them."""
    features = model.model.get_image_features(
        pixel_values, vision_feature_layer=-2, vision_feature_select_strategy="default"
    )
    features = getattr(features, "pooler_output", features)  # a model output in transformers 5
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def forward_kept(
    model: LlavaForConditionalGeneration,
    input_ids: list[int],
    features: torch.Tensor,
    kept: list[torch.Tensor],
    cut_layers: list[int],
    positions: str,
    extra_ids: list[int] = (),
) -> torch.Tensor:
    """Logits of the last token for one prompt, keeping the given patches at each stage.

    features: [n_images * N, D] every patch's projected feature. kept[0]: the patches entering the decoder;
    kept[s] (s >= 1): the patches left from cut_layers[s - 1] on. extra_ids: generated tokens appended
    after the prompt (always kept).
    """
    ids = torch.tensor(list(input_ids) + list(extra_ids))
    is_image = ids == IMAGE_TOKEN
    image_positions = is_image.nonzero().squeeze(1)
    lm = model.model.language_model
    embeds = lm.embed_tokens(ids)
    embeds[is_image] = features.to(embeds.dtype)
    original = torch.arange(len(ids))

    def keep_patches(patches: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[image_positions] = False
        keep[image_positions[patches]] = True
        return keep

    entry = keep_patches(kept[0])
    hidden, pos = embeds[entry][None], original[entry]
    if positions == "contiguous":
        pos = torch.arange(int(entry.sum()))
    alive = entry
    for index, layer in enumerate(lm.layers):
        if index in cut_layers:
            stage_keep = keep_patches(kept[cut_layers.index(index) + 1])
            inner = stage_keep[alive]
            hidden, pos = hidden[:, inner], pos[inner]
            if positions == "contiguous":
                pos = torch.arange(int(inner.sum()))
            alive = stage_keep
        n = hidden.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        position_embeddings = lm.rotary_emb(hidden, pos[None])
        hidden = layer(hidden, attention_mask=causal, position_ids=pos[None], position_embeddings=position_embeddings)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return model.lm_head(lm.norm(hidden))[0, -1]


def greedy_by_recompute(model, input_ids, features, kept, cut_layers, positions, steps: int) -> list[int]:
    """Greedy decoding that recomputes the whole pruned forward at every step, with no cache."""
    generated: list[int] = []
    for _ in range(steps):
        logits = forward_kept(model, input_ids, features, kept, cut_layers, positions, generated)
        generated.append(int(logits.argmax()))
    return generated


__all__ = ["IMAGE_TOKEN", "N_VISUAL", "forward_kept", "greedy_by_recompute", "image_features"]
