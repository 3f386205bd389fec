"""Small random LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL, Qwen3-VL and Gemma 3 models of the real classes, and prompts
for them."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    SiglipVisionConfig,
)

from conftest import left_pad, tiny_clip, tiny_tokenizer
from star import compat
from star.adapters.base import read_layout

IMAGE_TOKEN = 120
VISION_START, VISION_END, VIDEO_TOKEN = 122, 123, 121
CROP = 16  # LLaVA-NeXT: 32 px crops, 8 px patches
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
PATCH_DIM = 3 * 2 * 4 * 4  # Qwen: channels x temporal patch x 4 x 4 px


def _text(layers: int) -> dict:
    return dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=0,
    )


def tiny_llava_next(attn: str = "sdpa", seed: int = 0, layers: int = 6) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=tiny_clip(), text_config=LlamaConfig(**_text(layers)), image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2, image_grid_pinpoints=PINPOINTS,
    )
    model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation=attn).eval()
    model.generation_config.pad_token_id = 0
    return model


def tiny_qwen(version: str = "2", attn: str = "sdpa", seed: int = 0, layers: int = 6):
    """Qwen2-VL (version "2") or Qwen2.5-VL ("2.5"): 4 px patches, 2 x 2 merge; Qwen2.5-VL's tower has
    2 x 2-token windows and one full-attention layer that is not its last (fullatt_block_indexes=[1])."""
    torch.manual_seed(seed)
    text = {**_text(layers), "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    common = dict(in_channels=3, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_heads=4)
    if version == "2":
        vision = dict(depth=3, embed_dim=32, hidden_size=64, mlp_ratio=2, **common)
        config = Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
        cls = Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1], **common)
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    model = cls._from_config(config, attn_implementation=attn).eval()
    model.generation_config.pad_token_id = 0
    return model


def tiny_qwen3(attn: str = "sdpa", seed: int = 0, layers: int = 6, moe: bool = False):
    """Qwen3-VL (or its MoE variant): Qwen2-VL's 4 px patches and 2 x 2 merge, a 3-layer tower whose every layer
    feeds DeepStack (so decoder layers 0, 1, 2 receive features), interleaved M-RoPE, per-head q/k norms."""
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True, "rope_theta": 10000.0}
    text = {**_text(layers), "head_dim": 16, ("rope_parameters" if compat.V5 else "rope_scaling"): rope}
    if not compat.V5:
        text["rope_theta"] = 10000.0
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = dict(
        depth=3, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0, 1, 2],
    )
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    config_class, cls = (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else (Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    model = cls._from_config(config_class(vision_config=vision, text_config=text, **ids), attn_implementation=attn).eval()
    model.generation_config.pad_token_id = 0
    return model


def tiny_qwen3_5(attn: str = "sdpa", seed: int = 0, layers: int = 8):
    """Qwen3.5: Qwen3-VL's tower without DeepStack, and a hybrid decoder of three linear-attention (gated delta
    net) layers per full-attention layer (full attention at 3 and 7 of 8), rotary on half of each head. The
    linear layers' decay and gates are drawn at random (their initial values would make them nearly inert)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    text = {
        **_text(layers), "head_dim": 16, "rope_parameters": rope, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 8,
        "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    }
    vision = dict(
        depth=3, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
    )
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    model = Qwen3_5ForConditionalGeneration._from_config(Qwen3_5Config(vision_config=vision, text_config=text, **ids), attn_implementation=attn).eval()
    model.generation_config.pad_token_id = 0
    return model


GEMMA_TOKENS = 16  # Gemma 3: 32 px images, 2 px patches (16 x 16), pooled 4 x 4 into 4 x 4 tokens
BOI, EOI = 122, 123


def tiny_gemma3(attn: str = "sdpa", seed: int = 0, layers: int = 6, window: int = 128):
    """Gemma 3: sliding and global layers alternating, query_pre_attn_scalar apart from head_dim, a 2-layer
    SigLIP tower of 256 patches that the projector pools 4 x 4 (as the real 4096 into 256). The projector's
    weight, zero at initialisation, is drawn at random so that images matter."""
    torch.manual_seed(seed)
    text = {
        **_text(layers), "head_dim": 16, "query_pre_attn_scalar": 32, "sliding_window": window,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
    }
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=2)
    config = Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=GEMMA_TOKENS, image_token_index=IMAGE_TOKEN,
        boi_token_index=BOI, eoi_token_index=EOI,
    )
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    model.generation_config.pad_token_id = 0
    return model


def gemma_inputs(images: list[int], text: list[tuple[int, int]], seed: int = 0) -> dict:
    """Gemma 3 prompts: prompt r has images[r] images, each between start- and end-of-image tokens, between
    `text[r]` words; token_type_ids mark the image tokens, as the processor does."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for count, (before, after) in zip(images, text):
        ids = _words(before, g)
        for _ in range(count):
            ids += [BOI] + [IMAGE_TOKEN] * GEMMA_TOKENS + [EOI] + _words(1, g)
        prompts.append(ids + _words(after, g))
    inputs = left_pad(prompts)
    pixels = torch.randn(sum(images), 3, 32, 32, generator=g)
    return {**inputs, "pixel_values": pixels, "token_type_ids": (inputs["input_ids"] == IMAGE_TOKEN).long()}


def _words(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(1, IMAGE_TOKEN - 1, (n,), generator=g).tolist()


def next_inputs(model, sizes: list[list[tuple[int, int]]], text: list[tuple[int, int]], seed: int = 0) -> dict:
    """LLaVA-NeXT prompts: prompt r has images of the given (height, width) sizes between `text[r]` words."""
    g = torch.Generator().manual_seed(seed)
    flat = [s for row in sizes for s in row]
    image_sizes = torch.tensor(flat)
    pixels = torch.randn(len(flat), 5, 3, 32, 32, generator=g)
    lengths = [len(f) for f in image_features(model, pixels, image_sizes)]
    prompts, image = [], 0
    for row, (before, after) in zip(sizes, text):
        ids = _words(before, g)
        for _ in row:
            ids += [IMAGE_TOKEN] * lengths[image]
            image += 1
        prompts.append(ids + _words(after, g))
    return {**left_pad(prompts), "pixel_values": pixels, "image_sizes": image_sizes}


def qwen_inputs(grids: list[list[tuple[int, int]]], text: list[tuple[int, int]], seed: int = 0) -> dict:
    """Qwen2-VL prompts: prompt r has images of the given (h, w) patch grids, each between its vision
    start and end tokens, between `text[r]` words."""
    g = torch.Generator().manual_seed(seed)
    flat = [s for row in grids for s in row]
    grid_thw = torch.tensor([[1, h, w] for h, w in flat])
    pixels = torch.randn(int(grid_thw.prod(dim=-1).sum()), PATCH_DIM, generator=g)
    prompts = []
    for row, (before, after) in zip(grids, text):
        ids = _words(before, g)
        for h, w in row:
            ids += [VISION_START] + [IMAGE_TOKEN] * (h * w // 4) + [VISION_END]
        prompts.append(ids + _words(after, g))
    inputs = {**left_pad(prompts), "pixel_values": pixels, "image_grid_thw": grid_thw}
    if compat.V5:  # 5.x's Qwen2-VL reads the token types, which its processor returns, for its 3-D positions
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE_TOKEN).int()
    return inputs


def select_rows(inputs: dict, rows: list[int], images_per_row: list[int], patches_per_image: list[int] | None = None) -> dict:
    """The inputs of some prompts alone, their padding removed (their images follow them)."""
    starts = [sum(images_per_row[:r]) for r in range(len(images_per_row))]
    images = [i for r in rows for i in range(starts[r], starts[r] + images_per_row[r])]
    prompts = [inputs["input_ids"][r][inputs["attention_mask"][r].bool()].tolist() for r in rows]
    out = left_pad(prompts)
    if "image_sizes" in inputs:
        return {**out, "pixel_values": inputs["pixel_values"][images], "image_sizes": inputs["image_sizes"][images]}
    bounds = torch.tensor([0, *patches_per_image]).cumsum(0)
    pixels = torch.cat([inputs["pixel_values"][bounds[i] : bounds[i + 1]] for i in images])
    out = {**out, "pixel_values": pixels, "image_grid_thw": inputs["image_grid_thw"][images]}
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = (out["input_ids"] == IMAGE_TOKEN).int()
    return out


def image_features(model, *inputs) -> list[torch.Tensor]:
    """The model's own projected features of each image: a list in 4.57, a model output's `.pooler_output`
    in 5.x."""
    features = model.model.get_image_features(*inputs)
    return getattr(features, "pooler_output", features)


# -- references that share no code with `star`: the model's own parts, one prompt at a time -------------


def full_embeds(model, inputs: dict, row: int, images: list[int]) -> tuple[torch.Tensor, ...]:
    """For one prompt of `inputs` (its padding removed) and its images: ids [S], input embeddings [S, D] as
    the unpatched model builds them, rotary positions [P, S] (P = 1, or 3 for M-RoPE), and which image
    tokens are fixed (LLaVA-NeXT's newlines) [n_image_tokens]."""
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    lm = model.model.language_model
    embeds = lm.embed_tokens(ids).clone()
    if "image_sizes" in inputs:
        features = torch.cat(image_features(model, inputs["pixel_values"][images], inputs["image_sizes"][images]))
        fixed = (features == model.model.image_newline).all(dim=-1)
        positions = torch.arange(len(ids))[None]
    else:
        grid = inputs["image_grid_thw"][images]
        bounds = torch.tensor([0, *inputs["image_grid_thw"].prod(-1).tolist()]).cumsum(0)
        pixels = torch.cat([inputs["pixel_values"][bounds[i] : bounds[i + 1]] for i in images])
        features = torch.cat(image_features(model, pixels, grid))
        fixed = torch.zeros(len(features), dtype=torch.bool)
        prompt = {"image_grid_thw": grid, "mm_token_type_ids": (ids[None] == IMAGE_TOKEN).int()}
        positions = compat.qwen_prompt_positions(model, prompt, ids[None], torch.ones(1, len(ids), dtype=torch.long))[:, 0]
    embeds[ids == IMAGE_TOKEN] = features.to(embeds.dtype)
    return ids, embeds, positions, fixed


def forward_kept(model, ids, embeds, positions, fixed, kept, cut_layers, extra_ids=(), contiguous=False) -> torch.Tensor:
    """Logits of the last token of one prompt when only some of its image tokens are present.

    kept[0]: the places (among the prompt's image tokens) of the visual tokens entering the decoder;
    kept[s]: those left from cut_layers[s - 1] on. Fixed image tokens and text are always present; tokens
    of extra_ids follow the prompt, at the next positions.
    """
    lm = model.model.language_model
    extra = torch.tensor(list(extra_ids), dtype=torch.long)
    embeds = torch.cat([embeds, lm.embed_tokens(extra)])
    after = positions.max() + 1 + torch.arange(len(extra))
    positions = torch.cat([positions, after.expand(positions.shape[0], -1)], dim=1)
    columns = (ids == IMAGE_TOKEN).nonzero()[:, 0]

    def present(places: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(len(embeds), dtype=torch.bool)
        keep[columns] = fixed
        keep[columns[places[places >= 0]]] = True
        return keep

    alive = present(kept[0])
    hidden, pos = embeds[alive][None], positions[:, alive]
    for index, layer in enumerate(lm.layers):
        if index in cut_layers:
            stage = present(kept[cut_layers.index(index) + 1])
            inner = stage[alive]
            hidden, pos, alive = hidden[:, inner], pos[:, inner], stage
        if contiguous:
            pos = torch.arange(hidden.shape[1])[None]
        n = hidden.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        if getattr(layer, "linear_attn", None) is not None:  # Qwen3.5's linear attention: causal by itself, no padding
            causal = None
        rotary = lm.rotary_emb(hidden, pos if pos.shape[0] == 1 else pos[:, None, :])
        out = layer(hidden, attention_mask=causal, position_ids=pos if pos.shape[0] == 1 else None, position_embeddings=rotary)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(lm.norm(hidden))[0, -1]


def greedy_by_recompute(model, ids, embeds, positions, fixed, kept, cut_layers, steps: int) -> list[int]:
    """Greedy decoding that recomputes the whole pruned forward at every step, with no cache."""
    generated: list[int] = []
    for _ in range(steps):
        generated.append(int(forward_kept(model, ids, embeds, positions, fixed, kept, cut_layers, generated).argmax()))
    return generated


def kept_of(stats, row: int) -> list[torch.Tensor]:
    """The kept places of one prompt at each stage, padding (-1) removed."""
    return [k[row][k[row] >= 0] for k in stats.kept_patches]


def assert_batch_equals_each_alone(model, inputs: dict, method: str, keep, alone, **budget) -> None:
    """Under `method` at `keep` (or a `budget`, e.g. flops=0.3), each prompt of the batch `inputs` gets the
    answer, last prefill logits, token counts, kept sets and setting it gets alone; `alone(row)` gives that
    prompt's inputs by itself."""
    import star

    with star.apply(model, method=method, keep=keep, **budget) as pruner:
        together = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)[:, -6:]
        prefill = model(**inputs).logits[:, -1]
        batch_stats = pruner.stats
        for row in range(inputs["input_ids"].shape[0]):
            single = alone(row)
            answer = model.generate(**single, max_new_tokens=6, do_sample=False, min_new_tokens=6)[:, -6:]
            assert together[row].tolist() == answer[0].tolist()
            assert (model(**single).logits[0, -1] - prefill[row]).abs().max() < 1e-4
            assert pruner.stats.totals[0][0] == batch_stats.totals[row][0]
            assert by_layer(pruner.stats, 0) == by_layer(batch_stats, row)
            assert (pruner.stats.picks is None) == (batch_stats.picks is None)
            assert pruner.stats.picks is None or pruner.stats.picks[0] == batch_stats.picks[row]


def by_layer(stats, row: int) -> list[tuple[int, list[int]]]:
    """One prompt's visual tokens at each decoder layer: their count and kept places. (A batch whose prompts cut
    at different layers has the stages of all; a prompt keeps all its tokens at those it does not cut at.)"""
    kept = kept_of(stats, row)
    frames = [sum(layer <= i for layer in stats.layers) for i in range(len(stats.sequence_lengths))]
    return [(stats.totals[row][1 + f], kept[f].tolist()) for f in frames]


def layout_of(pruner, inputs: dict):
    """The `Layout` the pruner reads at prefill, for calling an adapter's `encode_prompts` directly."""
    ids = inputs["input_ids"]
    return read_layout(ids, inputs.get("attention_mask", torch.ones_like(ids)), pruner.adapter.image_token_id, pruner.adapter.image_sizes(inputs))


def qwen_processor():
    """Qwen2-VL's processor without its video part: in transformers 4.57 the video processor needs torchvision,
    which a CPU-only torch does not have. Images are processed exactly as by Qwen2VLProcessor."""
    from transformers import ProcessorMixin, Qwen2VLImageProcessor, Qwen2VLProcessor


    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        attributes = ["image_processor", "tokenizer"]
        tokenizer_class = "PreTrainedTokenizerFast"

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id, self.video_token_id = IMAGE_TOKEN, VIDEO_TOKEN
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    specials = {IMAGE_TOKEN: "<|image_pad|>", VIDEO_TOKEN: "<|video_pad|>", VISION_START: "<|vision_start|>", VISION_END: "<|vision_end|>"}
    tokenizer, template = tiny_tokenizer(specials, image_block="<|vision_start|> <|image_pad|> <|vision_end|> ")
    images = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64)
    return ImageOnlyQwen2VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template)
