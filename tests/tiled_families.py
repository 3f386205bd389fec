"""Small random LLaVA-OneVision and InternVL models of the real classes (Qwen2 decoders), prompts for them, and
references that share no code with `star`: the model's own embeddings of one prompt at a time."""

from __future__ import annotations

import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from conftest import left_pad
from families import IMAGE_TOKEN

CROP = 16  # OneVision: 32 px crops, 8 px patches, 4 x 4 patches each
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
TILE = 16  # InternVL: 32 px tiles, 4 px patches, 8 x 8 patches shuffled into 4 x 4 tokens


def _qwen2(layers: int) -> Qwen2Config:
    return Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=0,
    )


def tiny_onevision(attn: str = "sdpa", seed: int = 0, layers: int = 6) -> LlavaOnevisionForConditionalGeneration:
    """A SigLIP tower of 16 patches per crop. `anyres_max_2` (real checkpoints: 9) makes the tile grid of a
    square image (8 x 8 patches, over 2 x 1.1 x 1.1 crops' worth) resized to 5 x 5, so both paths run small."""
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=_qwen2(layers), image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_2", vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    model = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation=attn).eval()
    model.generation_config.pad_token_id = 0
    return model


def tiny_internvl(attn: str = "sdpa", seed: int = 0, layers: int = 6) -> InternVLForConditionalGeneration:
    """An InternViT tower of 2 layers with q/k norms (as InternViT-6B has), 64 patches and [CLS] per tile."""
    torch.manual_seed(seed)
    vision = InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4,
        use_qk_norm=True,
    )
    config = InternVLConfig(vision_config=vision, text_config=_qwen2(layers), image_token_id=IMAGE_TOKEN)
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attn).eval()
    model.generation_config.pad_token_id = 0
    return model


def _words(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(1, IMAGE_TOKEN - 1, (n,), generator=g).tolist()


def image_features(model, *args, **kwargs):
    """The model's own projected image features: a model output's `.pooler_output` in 5.x, the value in 4.57.
    OneVision: one [L, D] per image, newlines included; InternVL: [tiles, 16, D]."""
    features = model.model.get_image_features(*args, **kwargs)
    return getattr(features, "pooler_output", features)


def onevision_inputs(model, sizes: list[list[tuple[int, int]]], text: list[tuple[int, int]], seed: int = 0) -> dict:
    """OneVision prompts: prompt r has images of the given (height, width) sizes between `text[r]` words; a prompt
    with several images has each as its base crop alone (`batch_num_images`), as the processor does."""
    g = torch.Generator().manual_seed(seed)
    flat = [s for row in sizes for s in row]
    image_sizes = torch.tensor(flat)
    counts = torch.tensor([len(row) for row in sizes])
    pixels = torch.randn(len(flat), 5, 3, 32, 32, generator=g)
    lengths = [len(f) for f in image_features(model, pixels, image_sizes, batch_num_images=counts)]
    prompts, image = [], 0
    for row, (before, after) in zip(sizes, text):
        ids = _words(before, g)
        for _ in row:
            ids += [IMAGE_TOKEN] * lengths[image]
            image += 1
        prompts.append(ids + _words(after, g))
    return {**left_pad(prompts), "pixel_values": pixels, "image_sizes": image_sizes, "batch_num_images": counts}


def internvl_inputs(tiles: list[list[int]], text: list[tuple[int, int]], seed: int = 0) -> dict:
    """InternVL prompts: prompt r has images of the given numbers of tiles, each image between <img> (121) and
    </img> (122), between `text[r]` words."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(sum(sum(row) for row in tiles), 3, 32, 32, generator=g)
    prompts = []
    for row, (before, after) in zip(tiles, text):
        ids = _words(before, g)
        for count in row:
            ids += [121] + [IMAGE_TOKEN] * (TILE * count) + [122]
        prompts.append(ids + _words(after, g))
    return {**left_pad(prompts), "pixel_values": pixels}


def rows_alone(inputs: dict, rows: list[int], images_per_row: list[int]) -> dict:
    """The inputs of some prompts alone, their padding removed. For OneVision `images_per_row` counts images, for
    InternVL tiles."""
    starts = [sum(images_per_row[:r]) for r in range(len(images_per_row))]
    images = [i for r in rows for i in range(starts[r], starts[r] + images_per_row[r])]
    out = {**left_pad([inputs["input_ids"][r][inputs["attention_mask"][r].bool()].tolist() for r in rows]),
           "pixel_values": inputs["pixel_values"][images]}
    if "image_sizes" in inputs:
        out.update(image_sizes=inputs["image_sizes"][images], batch_num_images=inputs["batch_num_images"][rows])
    return out


def prompt_embeds(model, inputs: dict, row: int) -> tuple[torch.Tensor, ...]:
    """For one prompt of `inputs` (its padding removed): ids [S], input embeddings [S, D] as the unpatched model
    builds them, 1-D positions [1, S], and which image tokens are fixed (OneVision's newlines)."""
    alone = rows_alone(inputs, [row], _images_per_row(inputs))
    ids = alone["input_ids"][0]
    embeds = model.model.language_model.embed_tokens(ids).clone()
    if "image_sizes" in inputs:
        features = torch.cat(image_features(model, alone["pixel_values"], alone["image_sizes"], batch_num_images=alone["batch_num_images"]))
        fixed = (features == model.model.image_newline).all(dim=-1)
    else:
        features = image_features(model, alone["pixel_values"]).flatten(0, 1)
        fixed = torch.zeros(len(features), dtype=torch.bool)
    embeds[ids == IMAGE_TOKEN] = features.to(embeds.dtype)
    return ids, embeds, torch.arange(len(ids))[None], fixed


def _images_per_row(inputs: dict) -> list[int]:
    if "batch_num_images" in inputs:
        return inputs["batch_num_images"].tolist()
    return [int((ids == IMAGE_TOKEN).sum()) // TILE for ids in inputs["input_ids"]]
