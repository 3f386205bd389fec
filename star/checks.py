"""What the `star` command checks before any model loads or downloads: the device, the model's config, and
every setting on a skeleton of the model.

The skeleton is the model built from its config on the meta device: no weights, no memory, a fraction of a
second even for 7B. `star.apply` on it runs every check a real run would (budget against the visual tokens,
the method's options against the decoder's depth, positions and encoder against the family), so a bad
argument fails in the time it takes to read a config.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import star
from star.adapters import ADAPTERS

# SmolLM2-135M's decoder depth: with CLIP ViT-B/16 at 224 px, the default model's shape before its first build.
DEFAULT_MODEL_LAYERS = 30


def check_device(text: str) -> None:
    """A ValueError unless `text` is a torch device this machine has."""
    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        available.append("mps")
    try:
        device = str(torch.device(text))
    except RuntimeError:
        device = None
    if device not in available:
        raise ValueError(f"--device {text!r} is not a device of this machine: allowed are {', '.join(available)}")


def model_config(model: str | None, argument: str = "--model"):
    """The config of `argument`, read without its weights: a directory's config.json, a hub id's (only that file
    is fetched), or the default model's (its shape, when it is not built yet)."""
    from transformers import AutoConfig

    from star.zoo import star_home

    if model is None:
        built = star_home() / "default"
        return AutoConfig.from_pretrained(built) if (built / "config.json").is_file() else _default_model_config()
    path = Path(model).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"{argument} {model!r} is not a model directory: it holds no config.json")
    if not path.exists() and (path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1):
        raise ValueError(f"{argument} {model!r} does not exist: give a model directory or a hub id (e.g. llava-hf/llava-1.5-7b-hf)")
    if not path.exists():  # the Hub may take its time to answer, or to time out where there is no network
        print(f"{argument} {model!r}: reading its config.json from the Hugging Face Hub", file=sys.stderr, flush=True)
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"{argument} {model!r}: its config.json cannot be read ({reason})") from None


def _default_model_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from star.zoo.default_model import IMAGE_SIZE, PATCH_SIZE

    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    return LlavaConfig(vision_config=vision, text_config=LlamaConfig(num_hidden_layers=DEFAULT_MODEL_LAYERS), vision_feature_layer=-2)


def model_skeleton(model: str | None, argument: str = "--model") -> nn.Module:
    """The model of `argument` without weights (on the meta device), or a ValueError when it is no supported family."""
    from transformers import AutoModelForImageTextToText

    config = model_config(model, argument)
    supported = {cls.config_class.model_type for adapter in ADAPTERS for cls in adapter.model_classes}
    if config.model_type not in supported:
        raise ValueError(
            f"{argument} {model!r} is a {config.model_type!r} model: supported are the image-text families {', '.join(sorted(supported))}"
        )
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")


def check_setting(skeleton: nn.Module, method: str, keep: int | float, options: dict, positions: str) -> None:
    """A ValueError when star.apply would refuse this setting on the real model."""
    star.apply(skeleton, method=method, keep=keep, **{"positions": positions, **options}).remove()
