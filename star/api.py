"""The public API: two lines on a model that is already loaded.

    pruner = star.apply(model, method="star", keep=58)     # or flops=0.3: a compute budget
    model.generate(**inputs)              # the usual generate(): cache, greedy or sampling, batches
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from star import methods as registry
from star.adapters import adapter_for
from star.flops import DecoderShape
from star.methods import Method
from star.pruner import Pruner
from star.schedule import PromptBudget, Schedule, prompt_budget, resolve_budget


def apply(
    model: nn.Module,
    method: str = "star",
    keep: int | float | None = None,
    positions: str | None = None,
    *,
    flops: float | None = None,
    time: float | None = None,
    schedule: str | Path | Schedule | None = None,
    text_tokens: float | None = None,
    **options: object,
) -> Pruner:
    """Prune the visual tokens of `model` (this instance only) until `remove()` is called.

    keep: visual tokens per image left after the last stage (an int), or a fraction of the encoder's
    tokens (a float in (0, 1]; default 0.1). For LLaVA-NeXT the unit is a 576-token crop (base image or tile), as in the
    paper's Table 2(b); for LLaVA-OneVision a 729-token crop (its tile grid keeps keep x its tokens / 729);
    for InternVL a 256-token tile; for Qwen2-VL and Qwen3-VL an image, whatever its size. positions:
    "original" keeps each token's rotary position, "contiguous" renumbers the kept tokens without gaps; None
    (the default) takes the policy of the method's authors (`star methods` lists it), or "original" on M-RoPE
    models, which have no gap-free numbering of a subset (but for pool, whose grids are numbered as smaller
    images). options: the method's own (e.g. layer=16, stage1_ratio=0.15 for "star"; see `star.methods()` and
    each method's file). Every argument is checked before any compute.
    Pruning happens once per prompt, at prefill; the decoder layers from a cut on cache only the kept tokens.

    flops (or time): a compute budget instead of keep, as a fraction of the unpruned model's decoder prefill
    FLOPs (or prefill time): the most accurate setting of `schedule` (a file `star calibrate` wrote) that costs
    no more; without one, the schedule shipped for this model's shape, else the FLOPs formula alone (star.schedule).
    flops= is picked per prompt, at prefill, for its own text tokens and images (`pruner.stats.picks`), on
    families whose units have a nominal size (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, InternVL, Gemma 3: crops
    shown in part are costed at their own size); for time=, or with `text_tokens` given, once, for prompts of
    `text_tokens` text tokens (default 79); families whose images differ in size take keep= only. The pruner's `method` and
    `keep` show the pick for a prompt of 79 text tokens.
    """
    per_prompt: PromptBudget | None = None
    if flops is not None or time is not None:
        if flops is not None and time is not None:
            raise ValueError(f"flops={flops!r} and time={time!r} are both given: give one budget")
        kind, budget = ("flops", flops) if flops is not None else ("time", time)
        adapter = adapter_for(model)
        shape = DecoderShape.from_config(model.config.get_text_config())
        name = type(model).__name__
        units = adapter.budget_unit or adapter.n_visual
        if kind == "flops" and text_tokens is None and adapter.n_visual is not None:
            per_prompt = prompt_budget(method, options, keep, budget, schedule, shape, units, name, adapter.budget_unit)
            point = per_prompt.nominal()
        else:
            point, _ = resolve_budget(method, options, keep, kind, budget, schedule, shape, units, name, text_tokens)
        keep, options = point.keep, {**options, **point.options}
    elif schedule is not None or text_tokens is not None:
        given = f"schedule={str(schedule)!r}" if schedule is not None else f"text_tokens={text_tokens!r}"
        raise ValueError(f"{given} is given without a budget: add flops= or time=")
    chosen, positions = resolve(model, method, positions, **options)
    return Pruner(model, chosen, keep=0.1 if keep is None else keep, positions=positions, per_prompt=per_prompt)


def resolve(model: nn.Module, method: str, positions: str | None, **options: object) -> tuple[Method, str]:
    """The method `apply` builds from its name and options, and the position policy it takes (see `apply`)."""
    chosen = registry.build(method, **options)
    mrope = adapter_for(model).mrope and not chosen.grid_positions  # pool's grids have M-RoPE positions of their own
    return chosen, positions or ("original" if mrope else chosen.positions)


def methods() -> list[str]:
    """The registered method names."""
    return registry.methods()
