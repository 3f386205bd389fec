"""Every difference between the transformers lines we support (4.57 and 5.x), in one place.

The adapters and the pruner call these functions and never look at a version themselves. Each function
says what changed and in which direction; where a model lacks what both lines provide, it raises instead of
guessing, so a new version that moves something again fails loudly rather than pruning the wrong tokens.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
import transformers
from torch import nn

from star.decoder import gather_rotary, llama_style_qk, project_qk

MAJOR = int(transformers.__version__.split(".")[0])
V5 = MAJOR >= 5


def cache_of(kwargs: dict):
    """The KV cache a forward call was given: `cache` in 5.x, `past_key_values` in 4.57 (and as 5.x's
    deprecated alias, which a forward pre-hook sees before the model renames it)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def static_cache_length(cache, kwargs: dict, dropped: int) -> int:
    """Tokens a StaticCache holds, read back from the device (one sync). 5.x counts them in `cumulative_length`.
    4.57 counts the non-zero keys of row 0, too few where row 0 is left-padded with a zero embedding, so there the
    caller's `cache_position` says where the new tokens go, in the full prompt's places: less the `dropped`
    tokens the pruner's entry frame lacks."""
    cache_position = kwargs.get("cache_position")
    if V5 or cache_position is None:
        return int(cache.get_seq_length())
    return int(cache_position[0]) - dropped


def with_cache_position(kwargs: dict, cache_position: torch.Tensor) -> dict:
    """4.57's models and layers place new keys in the cache by `cache_position`; 5.x has no such argument
    (its caches append), so there it is not passed at all."""
    return kwargs if V5 else {**kwargs, "cache_position": cache_position}


def keep_pixels_for_forward(model: nn.Module) -> Callable[[], None]:
    """Make generate() hand this model its `pixel_values`, as 4.57 does, and return what undoes it.

    transformers 5's generate() runs the vision encoder itself before prefill, for models whose
    `input_modalities` include images, and passes the model `mm_encoder_outputs` with the raw inputs removed
    (LLaVA-NeXT's `image_sizes`, Qwen2-VL's `image_grid_thw`): stage 1 needs the encoder's inner attention and
    those inputs, and it must choose the patches before the projector. So on this one instance generate() is
    told the model takes text only; the forward itself still takes images. Should a later version encode by
    another route, the pruner's prefill guard raises instead of running unpruned.
    """
    if not V5:
        return lambda: None
    model.input_modalities = ("text",)
    return lambda: model.__dict__.pop("input_modalities", None)


def processor_kwargs() -> dict:
    """`AutoProcessor.from_pretrained`'s options: 4.57 warns on every load of a checkpoint saved with a slow
    image processor unless `use_fast` is given (its fast one needs torchvision, which a CPU-only torch lacks),
    so the saved choice is stated; 5.x chooses without a warning."""
    return {} if V5 else {"use_fast": False}


def processor_attributes(processor_class: type) -> list[str]:
    """The sub-processors a processor class is built from: 4.57 lists them in `attributes`, 5.x reads them from
    its `__init__`'s parameters."""
    return list(processor_class.get_attributes()) if V5 else list(processor_class.attributes)


IMAGE_PARTS = ("image_processor", "tokenizer")  # the sub-processors a prompt of images and text needs


def image_only_processor_class(processor_class: type) -> type:
    """`processor_class` with its image processor and tokenizer only, or the class itself where it has no other part.

    Every video processor of both lines needs torchvision, which a CPU-only torch lacks, and an audio feature
    extractor (Gemma 4's) reads no image, while images go through the image processor alone; so the processor is
    one subclass whose other slots stay empty. The family's own `__init__` runs unchanged, handed None for them:
    both lines drop a positional part past the declared list, and a keyword one (as Gemma 4 passes them) is left
    out by `_WithoutParts` before `ProcessorMixin` checks the parts.
    """
    attributes = processor_attributes(processor_class)
    dropped = [name for name in attributes if name not in IMAGE_PARTS]
    if not dropped:
        return processor_class

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                                 **dict.fromkeys(dropped), **kwargs)

    class _WithoutParts(transformers.ProcessorMixin):  # what the family's super().__init__ reaches
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{k: v for k, v in kwargs.items() if not (k in dropped and v is None)})

    kept = [name for name in attributes if name in IMAGE_PARTS]
    return type(f"ImageOnly{processor_class.__name__}", (processor_class, _WithoutParts),
                {"__init__": __init__, "attributes": kept, "__module__": processor_class.__module__})


# -- LLaVA: the CLIP tower ---------------------------------------------------------------------------


def clip_encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIP or SigLIP vision model: under `.vision_model` in 4.57, on the model itself
    in 5.x."""
    return getattr(tower, "vision_model", tower).encoder.layers


def clip_tower_state(tower: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `CLIPVisionModel` state dict (keys under `vision_model.`) for this line's tower: 5.x's has no
    `vision_model` level, so the prefix goes."""
    if hasattr(tower, "vision_model"):
        return state
    return {name.removeprefix("vision_model."): value for name, value in state.items()}


# -- Qwen2-VL / Qwen2.5-VL ---------------------------------------------------------------------------


def merged_tokens(output) -> torch.Tensor:
    """The merger's output of a Qwen vision tower call: a tensor in 4.57, `.pooler_output` of a model output
    in 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def deepstack_tokens(output) -> tuple[torch.Tensor, torch.Tensor]:
    """A Qwen3-VL vision tower call's merged tokens [T, D] and DeepStack features [T, E, D] (one per deepstack
    layer): a (tokens, list) tuple in 4.57, `.pooler_output` and `.deepstack_features` of a model output in 5.x."""
    tokens, deepstack = output if isinstance(output, tuple) else (output.pooler_output, output.deepstack_features)
    return tokens, torch.stack(list(deepstack), dim=1)


def window_order(visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """For Qwen2.5-VL's windowed tower, the merged token each of its blocks' token groups is (window order);
    for Qwen2-VL's tower, which keeps the natural order, arange.

    4.57 has it as the tower's `get_window_index`, 5.x as `transformers.vision_utils.get_vision_window_index`.
    A windowed tower without either raises: a wrong order puts every stage-1 score on the wrong token.
    """
    if not getattr(visual, "fullatt_block_indexes", None):
        return torch.arange(int((grid_thw.prod(dim=-1) // visual.spatial_merge_size**2).sum()))
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(grid_thw)[0]
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError as error:
        raise RuntimeError(
            f"transformers {transformers.__version__}: cannot find Qwen2.5-VL's window index (neither "
            "visual.get_window_index nor transformers.vision_utils.get_vision_window_index)"
        ) from error
    return get_vision_window_index(
        grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
        patch_size=visual.patch_size,
    )[0]


def qwen_prompt_positions(model: nn.Module, inputs: dict, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """3-D M-RoPE positions of a prompt: the caller's `position_ids` (generate() gives [4, B, S], text positions
    first), or the model's `get_rope_index`, [3, B, S].

    5.x reads the image tokens' places from `mm_token_type_ids` (its processor returns them; the model's own
    forward refuses images without them, and generate() without them numbers image tokens as text), so they
    are required here too. 4.57 finds them by id and takes the image grids as the second argument.
    """
    grid = inputs.get("image_grid_thw")
    if not V5:
        given = inputs.get("position_ids")
        return given if given is not None else model.model.get_rope_index(input_ids, grid, None, mask)[0]
    types = inputs.get("mm_token_type_ids")
    if types is None:
        raise ValueError(
            "mm_token_type_ids is None: transformers 5's Qwen2-VL places image tokens by them (the processor "
            "returns them with input_ids); pass them with the prompt"
        )
    given = inputs.get("position_ids")
    return given if given is not None else model.model.get_rope_index(input_ids, types, grid, None, mask)[0]


def qwen_grid_positions(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, grid_thw: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The model's 3-D positions, [3, B, S], of prompts `input_ids` whose images have the patch grids `grid_thw` (5.x
    places them by token type, which image tokens are; 4.57 by id)."""
    if not V5:
        return model.model.get_rope_index(input_ids, grid_thw, None, mask)[0]
    return model.model.get_rope_index(input_ids, (input_ids == image_token_id).int(), grid_thw, None, mask)[0]


def qwen_token_types(input_ids: torch.Tensor, image_token_id: int) -> dict:
    """What a Qwen2-VL prompt carries beside its ids, as the processor returns it: 5.x's `mm_token_type_ids` (1 at
    image tokens), which its model and generate() read for 3-D positions; nothing in 4.57, which finds image
    tokens by id."""
    return {"mm_token_type_ids": (input_ids == image_token_id).int()} if V5 else {}


def qwen_decoder_qk(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries for `rows` and all keys of a Qwen2-VL decoder layer, as `llama_style_qk`.

    In 5.x the rotary embedding mixes the three M-RoPE axes itself and hands layers cos, sin [B, S, d], so
    the layer rotates like Llama. In 4.57 cos, sin are [3, B, S, d], one per axis, and the family's
    `apply_multimodal_rotary_pos_emb` mixes them by the layer's `rope_scaling["mrope_section"]`.
    """
    if position_embeddings[0].dim() == 3:
        return llama_style_qk(layer, hidden, position_embeddings, rows)
    apply_rotary = sys.modules[type(layer).__module__].apply_multimodal_rotary_pos_emb
    section = layer.self_attn.rope_scaling["mrope_section"]
    q, k = project_qk(layer, hidden, rows)
    cos, sin = position_embeddings
    batch = hidden.shape[0]
    q = apply_rotary(q, q, gather_rotary(cos, rows), gather_rotary(sin, rows), section)[0]
    k = apply_rotary(k, k, cos.expand(-1, batch, -1, -1), sin.expand(-1, batch, -1, -1), section)[0]
    return q, k


def qwen_vision_rotary(block: nn.Module) -> Callable:
    """The family's `apply_rotary_pos_emb_vision(q, k, cos, sin)`, present in both lines."""
    return sys.modules[type(block).__module__].apply_rotary_pos_emb_vision


# -- decoder layers with several rotary tables ---------------------------------------------------------

# The rotary tables a decoder layer may be given, with the layer type each belongs to (None: the layer's own).
# 5.x hands every layer the table of its own type as `position_embeddings`; 4.57's Gemma 3 hands every layer
# both of its tables, and the layer picks one by its type.
ROTARY_TABLES = {"position_embeddings": None, "position_embeddings_global": "full_attention", "position_embeddings_local": "sliding_attention"}


def rotary_tables(kwargs: dict) -> dict[str, str | None]:
    """The rotary tables among a decoder layer's inputs: name -> the layer type it belongs to."""
    return {name: kind for name, kind in ROTARY_TABLES.items() if kwargs.get(name) is not None}


def layer_rotary(kwargs: dict, layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary table (cos, sin) a decoder layer of `layer_type` applies, from its inputs."""
    for name, kind in rotary_tables(kwargs).items():
        if kind is None or kind == layer_type:
            return kwargs[name]
    raise RuntimeError(f"transformers {transformers.__version__}: no rotary table for a {layer_type} layer among {sorted(kwargs)}")


# -- Gemma 3 -------------------------------------------------------------------------------------------


def gemma_rotary(decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str):
    """Gemma 3's rotary embedding of one layer type: 5.x has one module that takes the type, 4.57 two modules
    (`rotary_emb` for global layers, `rotary_emb_local` for sliding ones)."""
    if V5:
        return decoder.rotary_emb(hidden, position_ids, layer_type)
    module = decoder.rotary_emb_local if layer_type == "sliding_attention" else decoder.rotary_emb
    return module(hidden, position_ids)


def cache_kwargs(cache) -> dict:
    """A forward call's cache argument, by the name the installed line reads (`cache` from 5.x's rename on,
    `past_key_values` before)."""
    from transformers import LlamaModel

    name = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
    return {name: cache}


# -- Gemma 4 -------------------------------------------------------------------------------------------


def attention_for(config, attn: str) -> str | dict[str, str]:
    """The `attn_implementation` to build a model of `config` with: `attn`, except for an audio tower (Gemma 4's E2B
    and E4B), which has only eager attention and which the pruner never runs; 5.x takes one per sub-config."""
    if getattr(config, "audio_config", None) is None:
        return attn
    return {"": attn, **{name: attn for name in ("text_config", "vision_config")}, "audio_config": "eager"}


def gemma4_vision_rope(layer: nn.Module) -> Callable:
    """Gemma 4's `apply_multidimensional_rope(x, cos, sin, position_ids)`: the vision tower's 2-D rotary embedding,
    which splits each head into an x and a y half."""
    return sys.modules[type(layer).__module__].apply_multidimensional_rope


# -- families 5.x added (Qwen3.5, Gemma 4) ----------------------------------------------------------------


def model_classes(*names: str) -> tuple[type, ...]:
    """The transformers model classes of these names that the installed line has: 4.57 lacks the families of
    2026 (Qwen3.5 and Gemma 4 arrived in 5.x), whose adapters then match no model."""
    return tuple(getattr(transformers, name) for name in names if hasattr(transformers, name))


# Why the Qwen3.5 and Gemma 4 tests skip on 4.57 (their adapters match no model there), or None.
QWEN3_5_MISSING = None if model_classes("Qwen3_5ForConditionalGeneration") else f"transformers {transformers.__version__} has no Qwen3.5 (qwen3_5 came in 5.x)"
GEMMA4_MISSING = None if model_classes("Gemma4ForConditionalGeneration") else f"transformers {transformers.__version__} has no Gemma 4 (gemma4 came in 5.x)"
