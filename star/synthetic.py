"""Real architectures with random weights, and prompts of the paper's shape: speed without checkpoints.

Time and memory depend on the architecture, the sequence lengths, the dtype and the kernels, not on the weights'
values. So a shipped config's architecture (`star/configs/NAME.json`, key "architecture": its config.json's
architecture fields), built with random weights directly on the target device and fed a random image of the
family's native size inside a prompt of the paper's length, times what the checkpoint would. Its answers are
meaningless, and so is which tokens a score keeps; how many it keeps, and what that costs, are real.
"""

from __future__ import annotations

import copy
import json
from importlib.resources import files

import torch
from torch import nn

from star import compat
from star.adapters import adapter_for
from star.resize import check_model, resized_size
from star.flops import named_models

TEXT_TOKENS = 79  # prompt tokens besides the image: FasterVLM's row of the paper's Table 3 gives 79 for LLaVA-1.5 on MME
TEXT_BEFORE_IMAGE = 35  # about LLaVA's vicuna_v1 system line and "USER:"; the question and "ASSISTANT:" follow the image
NOTICE = "random weights: every answer is meaningless; every time, memory and FLOPs figure is real"


def shipped_configs() -> list[str]:
    """The shipped configs that carry an architecture, so `star bench --config NAME --random-init` can build them."""
    return [name for name in named_models() if "architecture" in _shipped(name)]


def buildable_configs() -> list[str]:
    """The shipped architectures this transformers has the model classes of (4.57 has no Gemma 4 or Qwen3.5)."""
    from transformers import CONFIG_MAPPING

    return [name for name in shipped_configs() if _shipped(name)["architecture"]["model_type"] in CONFIG_MAPPING]


def shipped_config(name: str):
    """The transformers config of a shipped architecture, or a ValueError naming the ones that exist."""
    if name not in shipped_configs():
        raise ValueError(f"--config {name!r} is not a shipped architecture: known are {', '.join(shipped_configs())}")
    import transformers
    from transformers import CONFIG_MAPPING, AutoConfig

    fields = dict(_shipped(name)["architecture"])
    model_type = fields.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"--config {name!r} is a {model_type!r} model, which transformers {transformers.__version__} lacks: it needs a later transformers")
    return AutoConfig.for_model(model_type, **fields)


def _shipped(name: str) -> dict:
    return json.loads(files("star").joinpath("configs", f"{name}.json").read_text())


def random_model(config, device: str, dtype: torch.dtype, attn: str, seed: int = 0) -> nn.Module:
    """The model of `config` with random weights, allocated once, in `dtype`, on `device`.

    Built inside `torch.device(device)`, every parameter and buffer is created on the device and initialised
    there by the model's own `_init_weights`: no CPU copy first, no second allocation, and buffers the
    constructor computes (rotary frequencies, position ids) are real values, not the garbage `to_empty` leaves.
    The seed is drawn in a forked generator and the config is copied (transformers writes the dtype and attention
    into it), so neither the caller's random state nor its config changes.
    """
    from transformers import AutoModelForImageTextToText

    config = copy.deepcopy(config)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=compat.attention_for(config, attn))
    text = config.get_text_config()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = text.pad_token_id if text.pad_token_id is not None else 0
    return model.eval()


def synthetic_inputs(model: nn.Module, batch: int, text_tokens: int = TEXT_TOKENS, seed: int = 0, resize: int | float | None = None) -> dict:
    """`batch` prompts for `model`, on its device: each `text_tokens` random text tokens (TEXT_BEFORE_IMAGE of them,
    at most, before the image; at least one after, for the text-guided scores) around one random image of the
    family's native size (the adapter's `synthetic_inputs`), or with `resize`, of a smaller square image of about
    that many tokens (star.resize; dynamic-resolution families only). Rows differ in text and pixels, not in length."""
    adapter = adapter_for(model)
    if not hasattr(adapter, "synthetic_inputs"):
        raise ValueError(f"{type(model).__name__} has no synthetic prompt: its adapter defines no synthetic_inputs")
    size = {}
    if resize is not None:
        check_model(model)
        merge = model.config.vision_config.spatial_merge_size
        side = resized_size(adapter.synthetic_patches, adapter.synthetic_patches, resize, merge)[0]
        size = {"side": side}
    generator = torch.Generator().manual_seed(seed)
    ids = _text_ids(model.config, generator, batch * text_tokens).view(batch, text_tokens)
    before = min(TEXT_BEFORE_IMAGE, text_tokens - 1)
    inputs = adapter.synthetic_inputs(ids[:, :before], ids[:, before:], generator, **size)
    device = next(model.parameters()).device
    return {name: value.to(device) for name, value in inputs.items()}


def native_layout(model: nn.Module) -> tuple[int, int, int]:
    """One image of the family's native size as the adapter's synthetic prompt lays it out: (visual tokens per unit,
    units, image tokens that are never pruned). A unit is what `keep` counts per: the image (LLaVA-1.5, Qwen, Gemma
    3), a crop (LLaVA-NeXT, LLaVA-OneVision, stacked [B, crops, 3, H, W]) or a tile (InternVL, [tiles, 3, H, W]); the
    rest of the image's tokens are newlines. Works on a weightless skeleton: nothing runs but the layout."""
    adapter = adapter_for(model)
    text = torch.full((1, 1), 3)
    inputs = adapter.synthetic_inputs(text, text, torch.Generator().manual_seed(0))
    image_tokens = int((inputs["input_ids"] == adapter.image_token_id).sum())
    pixels = inputs["pixel_values"]
    units = pixels.shape[1] if pixels.dim() == 5 else pixels.shape[0] if pixels.dim() == 4 else 1
    per_unit = adapter.n_visual or image_tokens  # Qwen: images differ in size, this one is the native one
    return per_unit, units, image_tokens - units * per_unit


def _text_ids(config, generator: torch.Generator, count: int) -> torch.Tensor:
    """Random ids of the text vocabulary, none of them a special id the config names (image, vision start, pad...)."""
    text = config.get_text_config()
    special = {
        value
        for source in (config.to_dict(), text.to_dict())
        for key, value in source.items()
        if key.endswith(("token_id", "token_index")) and isinstance(value, int)
    }
    allowed = torch.tensor(sorted(set(range(3, text.vocab_size)) - special))
    return allowed[torch.randint(len(allowed), (count,), generator=generator)]
