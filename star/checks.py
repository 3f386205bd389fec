"""What the `star` command checks before any model loads or downloads: the device, the model's config, and
every setting on a skeleton of the model.

The skeleton is the model built from its config on the meta device: no weights, no memory, a fraction of a
second even for 7B. `star.apply` on it runs every check a real run would (budget against the visual tokens,
the method's options against the decoder's depth, positions and encoder against the family), so a bad
argument fails in the time it takes to read a config.json.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from torch import nn

import star
from star import compat
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

    from star.zoo.default_model import cache_dir

    if model is None:
        built = cache_dir(None, "default")
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
    """The default model's shape before it is built: CLIP ViT-B/16 and SmolLM2-135M, so that checks and FLOPs
    budgets (which find the shipped schedule by the decoder's shape) answer as on the built model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from star.zoo.default_model import IMAGE_SIZE, PATCH_SIZE

    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    text = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=DEFAULT_MODEL_LAYERS, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152,
    )
    return LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2)


def model_skeleton(model: str | None, argument: str = "--model") -> nn.Module:
    """The model of `argument` without weights (on the meta device), or a ValueError when it is no supported family."""
    return skeleton_of(model_config(model, argument), f"{argument} {model!r}")


def skeleton_of(config, named: str = "the model") -> nn.Module:
    """The model of a config on the meta device, or a ValueError when it is no supported family."""
    from transformers import AutoModelForImageTextToText

    from star.families import listed

    supported = {cls.config_class.model_type for adapter in ADAPTERS for cls in adapter.model_classes}
    if config.model_type not in supported:
        raise ValueError(f"{named} is a {config.model_type!r} model: supported are the families {listed()}")
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, attn_implementation=compat.attention_for(config, "sdpa"))


def bench_config(model: str | None, config: str | None, random_init: bool):
    """The config `star bench` builds from: a shipped architecture (--config, random weights only) or --model's."""
    from star import synthetic

    if config is not None and model is not None:
        raise ValueError(f"--config {config!r} and --model {model!r} are both given: give one (--config builds a shipped architecture)")
    if config is not None and not random_init:
        raise ValueError(f"--config {config!r} ships an architecture, not weights: add --random-init")
    if random_init and config is None and model is None:
        raise ValueError("--random-init is given without --config or --model: name an architecture (the default model has its weights)")
    return synthetic.shipped_config(config) if config is not None else model_config(model)


def check_attention(attn: str, device: str) -> None:
    """FlashAttention-2 runs on a CUDA device with the flash-attn package; SDPA and eager run anywhere."""
    if attn != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if torch.device(device).type != "cuda":
        raise ValueError(f"--attn flash_attention_2 runs on CUDA only, not --device {device!r}: use --attn sdpa or eager there")
    if not is_flash_attn_2_available():
        raise ValueError("--attn flash_attention_2 needs the flash-attn package, which is not installed: use --attn sdpa or install flash-attn")


def check_memory(skeleton: nn.Module, dtype: str, device: str) -> None:
    """A ValueError when the weights alone, in `dtype`, exceed the memory `device` has free now."""
    need = sum(p.numel() for p in skeleton.parameters()) * getattr(torch, dtype).itemsize
    if torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        meminfo = Path("/proc/meminfo")
        found = re.search(r"MemAvailable:\s+(\d+) kB", meminfo.read_text()) if meminfo.is_file() else None
        if found is None:
            return
        free = int(found.group(1)) * 1024
    if need > free:
        raise ValueError(
            f"--dtype {dtype}: the weights alone need {need / 2**30:.1f} GiB and --device {device!r} has {free / 2**30:.1f} GiB "
            "available: choose a smaller dtype or model, or free memory"
        )


def check_setting(
    skeleton: nn.Module, method: str, keep: int | float | None, options: dict, positions: str, flops: float | None = None,
    time: float | None = None, schedule: str | None = None,
) -> None:
    """A ValueError when star.apply would refuse this setting (a keep, a FLOPs budget, or a time budget picked from
    `schedule`) on the real model."""
    budget = {"time": time, "schedule": schedule} if time is not None else {"flops": flops}
    star.apply(skeleton, method=method, keep=keep, **budget, **{"positions": positions, **options}).remove()


def check_resize(skeleton: nn.Module, keep: int | float) -> None:
    """A ValueError where `resize` at `keep` cannot run on the model (a fixed-resolution encoder, a bad keep)."""
    from star import resize

    resize.check_keep(keep)
    resize.check_model(skeleton)


def check_viz(model: str | None) -> None:
    """`star run --save-viz` draws the kept tokens on one square grid of patches per image, as LLaVA-1.5 has them."""
    from star.families import FAMILIES, family_of

    family = family_of(model_config(model).model_type)
    if family is not None and not family.square_grid:
        drawn = ", ".join(f.name for f in FAMILIES if f.square_grid)
        raise ValueError(
            f"--save-viz draws one square grid of patches per image ({drawn}); --model {model!r} is {family.name}, whose "
            "images are laid out otherwise: leave --save-viz out"
        )
