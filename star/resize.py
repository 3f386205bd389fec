"""`resize`: the image made smaller before the processor, so that the vision encoder emits about `keep` tokens.

Not a pruner: nothing is hooked, the model runs unpruned on a smaller image, and the encoder does less work too
(its attention is quadratic in the patches it sees). It applies where the encoder sees each image at its own
resolution, one decoder token per `unit` x `unit` pixels: Qwen2-VL and Qwen2.5-VL (14 px patches merged 2 x 2:
28 px), Qwen3-VL and Qwen3.5 (16 px patches: 32 px). A fixed-resolution tower (LLaVA-1.5's CLIP, Gemma 3's SigLIP,
InternVL's tiles), the any-resolution LLaVA families (every crop resized to the tower's size, so a smaller
image only changes how many tiles it gets) and Gemma 4 (its processor scales every image to fill max_soft_tokens)
give as many tokens whatever the image's size, and are refused. `star eval --methods none,star,resize` and
`star bench` take it beside the methods.
"""

from __future__ import annotations

import math

from PIL import Image

NAME = "resize"


def token_unit(processor) -> int:
    """Pixels per side of one decoder token for a dynamic-resolution processor (patch size x merge size), or a
    ValueError naming the processor where its encoder sees images at a fixed size."""
    images = getattr(processor, "image_processor", processor)
    patch, merge = getattr(images, "patch_size", None), getattr(images, "merge_size", None)
    if not isinstance(patch, int) or not isinstance(merge, int):
        raise ValueError(
            f"resize needs a processor that sees each image at its own resolution (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, "
            f"Qwen3.5): {type(images).__name__} resizes every image (or crop) to the encoder's fixed size (or token "
            "budget), so a smaller image gives as many tokens; prune instead (pool is the downsampling baseline there)"
        )
    return patch * merge


def resized_size(height: int, width: int, keep: int | float, unit: int) -> tuple[int, int]:
    """(height, width), multiples of `unit` of the image's aspect, of about `keep` tokens (a float: that fraction of
    the image's own (height / unit) x (width / unit)); never larger than the image's own size rounded to units."""
    own = (height / unit) * (width / unit)
    target = keep * own if isinstance(keep, float) else keep
    scale = min(1.0, math.sqrt(target / own))
    rows = max(1, round(height * scale / unit))
    cols = max(1, round(width * scale / unit))
    return rows * unit, cols * unit


def resize_image(image: Image.Image, processor, keep: int | float) -> Image.Image:
    """The image at `resized_size` (bicubic), for the processor to encode into about `keep` tokens."""
    check_keep(keep)
    height, width = resized_size(image.height, image.width, keep, token_unit(processor))
    return image if (width, height) == image.size else image.resize((width, height), Image.Resampling.BICUBIC)


def check_keep(keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or keep <= 0 or (isinstance(keep, float) and keep > 1):
        raise ValueError(f"keep={keep!r} for resize must be an int >= 1 (tokens per image) or a float in (0, 1] (a fraction of its own)")


def check_model(model) -> None:
    """A ValueError before any compute where the model's encoder sees images at a fixed size (its adapter counts
    a fixed number of visual tokens per image or crop)."""
    from star.adapters import adapter_for

    adapter = adapter_for(model)
    if adapter.n_visual is not None:
        raise ValueError(
            f"resize needs a model whose encoder sees each image at its own resolution (Qwen2-VL, Qwen2.5-VL, "
            f"Qwen3-VL, Qwen3.5): {type(model).__name__} encodes every image (or crop) at a fixed size, "
            f"{adapter.n_visual} tokens each, so a smaller image gives as many; prune instead (pool is the "
            "downsampling baseline there)"
        )
    if not adapter.resizable:
        raise ValueError(
            f"resize needs a model whose encoder sees each image at its own resolution (Qwen2-VL, Qwen2.5-VL, "
            f"Qwen3-VL, Qwen3.5): {type(model).__name__}'s processor scales every image, up or down, to fill its "
            "token budget (Gemma 4: max_soft_tokens), so a smaller image gives as many; lower that budget, or prune "
            "(pool is the downsampling baseline)"
        )
