"""The model families the `star` command and the lmms-eval backend take, in one table, and how a checkpoint of any
of them is loaded for images and text.

A family is named by the `model_type`s of its checkpoints' config.json; its adapter (star/adapters/) prunes it, and
its own processor and chat template build its prompts. A new family is one line here, beside its adapter and a tiny
checkpoint in tests/checkpoints.py (tests/test_cli_families.py holds the three together).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    checkpoint: str  # a real checkpoint of the family, for help texts and the README
    square_grid: bool = False  # one square grid of patches per image, as `star run --save-viz` draws it
    needs: str | None = None  # the transformers line that has the family, where 4.57 lacks it


FAMILIES = [
    Family("LLaVA-1.5", ("llava",), "llava-hf/llava-1.5-7b-hf", square_grid=True),
    Family("LLaVA-NeXT", ("llava_next",), "llava-hf/llava-v1.6-vicuna-7b-hf"),
    Family("LLaVA-OneVision", ("llava_onevision",), "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
    Family("Qwen2-VL", ("qwen2_vl",), "Qwen/Qwen2-VL-7B-Instruct"),
    Family("Qwen2.5-VL", ("qwen2_5_vl",), "Qwen/Qwen2.5-VL-7B-Instruct"),
    Family("Qwen3-VL", ("qwen3_vl", "qwen3_vl_moe"), "Qwen/Qwen3-VL-8B-Instruct"),
    Family("InternVL3", ("internvl",), "OpenGVLab/InternVL3-8B-hf"),
    Family("Gemma 3", ("gemma3",), "google/gemma-3-4b-it"),
    Family("Qwen3.5", ("qwen3_5",), "Qwen/Qwen3.5-9B", needs="transformers 5.x"),
    Family("Gemma 4", ("gemma4",), "google/gemma-4-E4B-it", needs="transformers 5.x"),
]


def family_of(model_type: str) -> Family | None:
    return next((family for family in FAMILIES if model_type in family.model_types), None)


def listed() -> str:
    """The families with a checkpoint each, as help texts and errors name them."""
    return ", ".join(f"{family.name} ({family.checkpoint}{f'; {family.needs}' if family.needs else ''})" for family in FAMILIES)


def load_processor(path: str, argument: str = "--model"):
    """The checkpoint's own processor (its image processor, tokenizer and chat template), without a video processor
    or an audio feature extractor.

    `AutoProcessor` would also build the video processor that Qwen2.5-VL, Qwen3-VL, Qwen3.5, InternVL, OneVision
    and Gemma 4 checkpoints ship, and every video processor needs torchvision, which a CPU-only torch lacks; star
    answers about images only. A part that needs a package the environment lacks is a ValueError naming it.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    from star import compat

    config = AutoConfig.from_pretrained(path)
    if type(config) not in PROCESSOR_MAPPING:
        raise ValueError(f"{argument} {path!r} is a {config.model_type!r} model with no processor: supported are {listed()}")
    base = PROCESSOR_MAPPING[type(config)]
    cls = compat.image_only_processor_class(base)
    try:
        image_processor = AutoImageProcessor.from_pretrained(path, **compat.processor_kwargs())
        tokenizer = AutoTokenizer.from_pretrained(path)
        options, _ = cls.get_processor_dict(path)
    except ImportError as error:
        raise ValueError(f"{argument} {path!r}: its processor needs a package this environment lacks: {_one_line(error)}") from None
    except OSError as error:
        raise ValueError(f"{argument} {path!r}: its processor cannot be read: {_one_line(error)}") from None
    accepted = set(inspect.signature(base.__init__).parameters) - {"self", *compat.processor_attributes(base)}
    return cls(image_processor=image_processor, tokenizer=tokenizer, **{k: v for k, v in options.items() if k in accepted})


def load_model(path: str, dtype, attn_implementation: str = "sdpa", argument: str = "--model"):
    """The checkpoint's model (AutoModelForImageTextToText; an audio tower with the attention it has, as
    compat.attention_for says), or a ValueError naming a package it needs."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from star import compat

    attn = compat.attention_for(AutoConfig.from_pretrained(path), attn_implementation)
    try:
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except ImportError as error:
        raise ValueError(f"{argument} {path!r}: the model needs a package this environment lacks: {_one_line(error)}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()).strip() or type(error).__name__

