"""The public API: two lines on a model that is already loaded.

    pruner = star.apply(model, method="star", keep=58)
    model.generate(**inputs)              # the usual generate(): cache, greedy or sampling, batches
"""

from __future__ import annotations

from torch import nn

from star import methods as registry
from star.adapters import adapter_for
from star.methods import Method
from star.pruner import Pruner


def apply(model: nn.Module, method: str = "star", keep: int | float = 0.1, positions: str | None = None, **options: object) -> Pruner:
    """Prune the visual tokens of `model` (this instance only) until `remove()` is called.

    keep: visual tokens per image left after the last stage (an int), or a fraction of the encoder's
    tokens (a float in (0, 1]). For LLaVA-NeXT the unit is a 576-token crop (base image or tile), as in the
    paper's Table 2(b); for LLaVA-OneVision a 729-token crop (its tile grid keeps keep x its tokens / 729);
    for InternVL a 256-token tile; for Qwen2-VL and Qwen3-VL an image, whatever its size. positions:
    "original" keeps each token's rotary position, "contiguous" renumbers the kept tokens without gaps; None
    (the default) takes the policy of the method's authors (`star methods` lists it), or "original" on M-RoPE
    models, which have no gap-free numbering. options: the method's own (e.g. layer=16, stage1_ratio=0.15
    for "star"; see `star.methods()` and each method's file). Every argument is checked before any compute.
    Pruning happens once per prompt, at prefill; the decoder layers from a cut on cache only the kept tokens.
    """
    chosen, positions = resolve(model, method, positions, **options)
    return Pruner(model, chosen, keep=keep, positions=positions)


def resolve(model: nn.Module, method: str, positions: str | None, **options: object) -> tuple[Method, str]:
    """The method `apply` builds from its name and options, and the position policy it takes (see `apply`)."""
    chosen = registry.build(method, **options)
    return chosen, positions or ("original" if adapter_for(model).mrope else chosen.positions)


def methods() -> list[str]:
    """The registered method names."""
    return registry.methods()
