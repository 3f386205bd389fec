"""Tiny checkpoints of every family, saved to disk as a real one ships: config and weights, the tokenizer (built
locally), the image processor's preprocessor_config.json naming its processor class, processor_config.json, the chat
template, and, where the family's processor has one, the video processor's config (which needs torchvision to load,
as on a real Qwen2.5-VL, Qwen3-VL, InternVL or OneVision checkpoint).

`CHECKPOINTS` maps a family's name (star.families) to (builder, keep): `builder(directory)` writes the checkpoint and
returns its path; `keep` is a budget that prunes its tiny images. `MISSING` says why a family cannot be built by the
installed transformers (Qwen3.5 and Gemma 4 came in 5.x), or None.
"""

from __future__ import annotations

import json
from pathlib import Path

from star import compat
from conftest import IMAGE_TOKEN as LLAVA_IMAGE_TOKEN
from conftest import llava_style_processor, save_checkpoint, tiny_llava, tiny_tokenizer
from families import BOI, EOI, IMAGE_TOKEN, PINPOINTS, VIDEO_TOKEN, VISION_END, VISION_START, tiny_gemma3, tiny_llava_next, tiny_qwen, tiny_qwen3, tiny_qwen3_5
from test_gemma4 import AUDIO, tiny_gemma4
from tiled_families import tiny_internvl, tiny_onevision

QWEN_SPECIALS = {IMAGE_TOKEN: "<|image_pad|>", VIDEO_TOKEN: "<|video_pad|>", VISION_START: "<|vision_start|>", VISION_END: "<|vision_end|>"}


def save_parts(directory, model, image_processor, tokenizer, template: str, processor_class: str, options: dict,
               video: dict | None = None, tokenizer_class: str | None = None, fast: bool = False) -> str:
    """Write a checkpoint file by file, as the hub has it (the processor cannot be saved whole where its video
    processor needs torchvision). `tokenizer_class` names the family's tokenizer class in tokenizer_config.json, as
    a real checkpoint does, where its processor accepts no other; `fast` names the torchvision-backed ("Fast") image
    processor, as Qwen3-VL's and InternVL3's checkpoints do."""
    directory = Path(save_checkpoint(directory, model))
    image_processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if tokenizer_class is not None:
        settings = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": tokenizer_class}, indent=2))
    preprocessor = json.loads((directory / "preprocessor_config.json").read_text())
    if fast:
        preprocessor["image_processor_type"] = preprocessor["image_processor_type"].removesuffix("Fast") + "Fast"
    (directory / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "processor_class": processor_class}, indent=2))
    (directory / "processor_config.json").write_text(json.dumps({"processor_class": processor_class, **options}, indent=2))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    if video is not None:
        (directory / "video_preprocessor_config.json").write_text(json.dumps({**video, "processor_class": processor_class}, indent=2))
    return str(directory)


def llava(directory) -> str:
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return save_checkpoint(directory, tiny_llava(), llava_style_processor(LlavaProcessor, images, LLAVA_IMAGE_TOKEN))


def llava_next(directory) -> str:
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    images = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    return save_checkpoint(directory, tiny_llava_next(), llava_style_processor(LlavaNextProcessor, images, IMAGE_TOKEN))


def onevision(directory) -> str:
    from transformers import LlavaOnevisionImageProcessor

    tokenizer, template = tiny_tokenizer({IMAGE_TOKEN: "<image>", VIDEO_TOKEN: "<video>"})
    images = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    options = {"num_image_tokens": 16, "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_2", "image_token": "<image>"}
    video = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 32, "width": 32}}
    return save_parts(directory, tiny_onevision(), images, tokenizer, template, "LlavaOnevisionProcessor", options, video)


def qwen_images():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64)


def qwen(version: str):
    def build(directory) -> str:
        tokenizer, template = tiny_tokenizer(QWEN_SPECIALS, image_block="<|vision_start|> <|image_pad|> <|vision_end|> ")
        model = {"3": tiny_qwen3, "3.5": tiny_qwen3_5}.get(version, lambda: tiny_qwen(version))()
        name = {"2": "Qwen2VLProcessor", "2.5": "Qwen2_5_VLProcessor", "3": "Qwen3VLProcessor", "3.5": "Qwen3VLProcessor"}[version]
        video = {"video_processor_type": "Qwen3VLVideoProcessor" if version in ("3", "3.5") else "Qwen2VLVideoProcessor",
                 "patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
        # 4.57's Qwen processors take a Qwen2Tokenizer only, and it reads tokenizer.json as saved; 5.x's rebuilds its
        # byte-level pipeline around the vocabulary, which 128 words cannot hold, and its processors take any tokenizer.
        named = None if compat.V5 else "Qwen2Tokenizer"
        return save_parts(directory, model, qwen_images(), tokenizer, template, name, {}, video, tokenizer_class=named, fast=version in ("3", "3.5"))

    return build


def internvl(directory) -> str:
    from transformers import GotOcr2ImageProcessor

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    specials = {IMAGE_TOKEN: "<IMG_CONTEXT>", VIDEO_TOKEN: "<video>", VISION_START: "<img>", VISION_END: "</img>"}
    tokenizer, template = tiny_tokenizer(specials, image_block="<IMG_CONTEXT> ", named=named)
    images = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4)
    video = {"video_processor_type": "InternVLVideoProcessor", "size": {"height": 32, "width": 32}}
    return save_parts(directory, tiny_internvl(), images, tokenizer, template, "InternVLProcessor", {"image_seq_length": 16}, video, fast=True)


def gemma3(directory) -> str:
    from transformers import Gemma3ImageProcessor

    named = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    specials = {IMAGE_TOKEN: "<image_soft_token>", BOI: "<start_of_image>", EOI: "<end_of_image>"}
    tokenizer, template = tiny_tokenizer(specials, image_block="<start_of_image> ", named=named)
    images = Gemma3ImageProcessor(size={"height": 32, "width": 32})
    return save_parts(directory, tiny_gemma3(), images, tokenizer, template, "Gemma3Processor", {"image_seq_length": 16})


def gemma4(directory) -> str:
    """Gemma 4 as google/gemma-4-E4B-it ships it, less its audio tower (the tiny model has none): images of their own
    sizes (2 px patches pooled 2 x 2, at most 70 tokens), the audio tokens its processor reads, a video processor."""
    from transformers import Gemma4ImageProcessorPil

    named = {"boi_token": "<|image>", "image_token": "<|image|>", "eoi_token": "<image|>", "audio_token": "<|audio|>",
             "boa_token": "<|audio>", "eoa_token": "<audio|>"}
    specials = {IMAGE_TOKEN: "<|image|>", VIDEO_TOKEN: "<|video|>", BOI: "<|image>", EOI: "<image|>", AUDIO: "<|audio|>",
                AUDIO + 1: "<|audio>", AUDIO + 2: "<audio|>"}
    tokenizer, template = tiny_tokenizer(specials, image_block="<|image|> ", named=named)
    images = Gemma4ImageProcessorPil(patch_size=2, pooling_kernel_size=2, max_soft_tokens=70)
    video = {"video_processor_type": "Gemma4VideoProcessor", "patch_size": 2, "pooling_kernel_size": 2, "max_soft_tokens": 70}
    return save_parts(directory, tiny_gemma4(), images, tokenizer, template, "Gemma4Processor", {"image_seq_length": 70}, video)


CHECKPOINTS = {
    "LLaVA-1.5": (llava, 4),
    "LLaVA-NeXT": (llava_next, 6),
    "LLaVA-OneVision": (onevision, 6),
    "Qwen2-VL": (qwen("2"), 5),
    "Qwen2.5-VL": (qwen("2.5"), 5),
    "Qwen3-VL": (qwen("3"), 5),
    "InternVL3": (internvl, 6),
    "Gemma 3": (gemma3, 6),
    "Qwen3.5": (qwen("3.5"), 5),
    "Gemma 4": (gemma4, 6),
}
MISSING = {name: {"Qwen3.5": compat.QWEN3_5_MISSING, "Gemma 4": compat.GEMMA4_MISSING}.get(name) for name in CHECKPOINTS}
