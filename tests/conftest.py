"""Small random LLaVA models of the real classes (CLIP tower with [CLS], Llama decoder with grouped-query
attention, the LLaVA projector), and prompts for them, so the mechanics run in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 127
N_VISUAL = 16  # 32 px images, 8 px patches


def tiny_clip() -> CLIPVisionConfig:
    """A 3-layer CLIP tower for 32 px images of 8 px patches (16 patches and [CLS])."""
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=16,
    )


def tiny_llava(attn: str = "sdpa", seed: int = 0, layers: int = 6) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = tiny_clip()
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2)
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def prompt_ids(before: int, after: int, seed: int, images: int = 1) -> list[int]:
    """A prompt of `before` text tokens, the image block(s), then `after` text tokens (the question)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, IMAGE_TOKEN - 1, (before + after,), generator=g).tolist()
    return ids[:before] + [IMAGE_TOKEN] * (N_VISUAL * images) + ids[before:]


def left_pad(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batch(prompts: list[list[int]], images: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded input_ids / attention_mask and one random image per prompt."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(prompts) * images, 3, 32, 32, generator=g)
    return {**left_pad(prompts), "pixel_values": pixels}


@pytest.fixture
def model() -> LlavaForConditionalGeneration:
    return tiny_llava()


def tiny_tokenizer(specials: dict[int, str], image_block: str = "<image> ", named: dict[str, str] | None = None):
    """A word-level tokenizer of 128 ids (the tiny models' vocabulary) with `specials` at their ids, and a chat
    template that writes `image_block` for each image, then the text, then "answer :". `named` gives special
    tokens the attribute names a family's processor reads (InternVL's `context_image_token`, Gemma 3's
    `boi_token`), as a real checkpoint's tokenizer_config.json does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "answer", ":", "?", ".", "what", "color", "shape", "is", "the", "how", "many"]
    words += [f"w{i}" for i in range(len(words), 128)]
    for token_id, token in specials.items():
        words[token_id] = token
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(["<pad>", "<unk>", "<s>", "</s>", *specials.values()])
    template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image_block +
        "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}answer :{% endif %}"
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", padding_side="left",
        model_input_names=["input_ids", "attention_mask"], **({"extra_special_tokens": named} if named else {}),
    )
    return tokenizer, template


def llava_style_processor(processor_class, image_processor, image_token_id: int):
    """A LLaVA or LLaVA-NeXT processor over the tiny tokenizer: 8 px patches, [CLS] dropped, "<image>" expanded."""
    tokenizer, template = tiny_tokenizer({image_token_id: "<image>"})
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1, chat_template=template,
    )


def save_checkpoint(directory, model, processor=None) -> str:
    """Save a tiny model (generation ends at "</s>") and its processor where `from_pretrained` finds them."""
    model.generation_config.eos_token_id = 3
    model.save_pretrained(directory)
    if processor is not None:
        processor.save_pretrained(directory)
    return str(directory)


def tiny_checkpoint(directory, seed: int = 0) -> str:
    """A saved tiny LLaVA with a word-level tokenizer and a 32 px image processor: a complete checkpoint
    that `from_pretrained` and `AutoProcessor` load, for the command-line and evaluation mechanics."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return save_checkpoint(directory, tiny_llava(seed=seed), llava_style_processor(LlavaProcessor, images, IMAGE_TOKEN))
