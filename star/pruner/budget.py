"""The budget: `keep` as token counts, for the whole model, for each unit of an image and for each stage."""

from __future__ import annotations

from dataclasses import fields, replace

from star.methods import LLMStage, Method, Plan

# Families whose images differ in size (Qwen2-VL) get a notional image of this many tokens at apply(), to
# check the options and place the hooks; the real plans are made per image at prefill.
NOMINAL_TOKENS = 16384


def resolve_keep(keep: int | float, n_visual: int | None) -> int:
    """`keep` as a token count: an int in [1, n_visual], or a float in (0, 1] as a fraction of n_visual.

    n_visual is None for families whose images differ in size: an int is then checked against each image.
    """
    bound = "" if n_visual is None else f", {n_visual}"
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep={keep!r} must be an int in [1{bound}] or a float in (0, 1]")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep!r} as a fraction must be in (0, 1]")
        return max(1, round(keep * (n_visual or NOMINAL_TOKENS)))
    if keep < 1 or (n_visual is not None and keep > n_visual):
        raise ValueError(f"keep={keep!r} is outside [1{bound}]: the model has {n_visual or 'a varying number of'} visual tokens per image")
    return keep


def unit_keep(keep: int | float, n: int, budget_unit: int | None) -> int:
    """The budget of one unit of n visual tokens.

    A fraction applies to every unit. An int counts tokens per `budget_unit` tokens (LLaVA-NeXT: per 576-token
    crop, so a crop the prompt shows only in part keeps the same fraction), or per image where that is None.
    """
    if isinstance(keep, float):
        return max(1, round(keep * n))
    if budget_unit is None:
        if keep > n:
            raise ValueError(f"keep={keep} is above the {n} visual tokens of an image in this batch: pass at most {n}, or a fraction")
        return keep
    return keep if n == budget_unit else min(n, max(1, round(keep * n / budget_unit)))


class Budget:
    """A method's plans on one model: the nominal plan that places the hooks, and one per unit size met.

    n_visual: the model's visual tokens per image, or None where images differ in size (the nominal plan is
    then made for NOMINAL_TOKENS). budget_unit: what an int `keep` counts per (see `unit_keep`).
    """

    def __init__(
        self, method: Method, keep: int | float, n_visual: int | None, budget_unit: int | None, num_layers: int,
        attention_layers: tuple[int, ...] | None = None,
    ):
        """attention_layers: the layers a decoder stage may score at (a hybrid decoder's softmax-attention
        layers), or None for every layer."""
        self.method = method
        self.given = keep
        self.keep = resolve_keep(keep, n_visual)
        self.budget_unit = budget_unit
        self.num_layers = num_layers
        self.attention_layers = attention_layers
        self.plan = self._planned(n_visual or max(NOMINAL_TOKENS, self.keep), self.keep)
        check_stages(self.plan.llm_stages)
        self._plans: dict[tuple[int, tuple[int, int] | None], Plan] = {}

    def unit_plan(self, n: int, grid: tuple[int, int] | None = None) -> Plan:
        """The method's plan for one unit (an image, a LLaVA-NeXT crop) of n visual tokens, laid out as `grid`
        (rows, columns; None where the family gives none)."""
        if (n, grid) not in self._plans:
            plan = self._planned(n, unit_keep(self.given, n, self.budget_unit), grid)
            nominal = {s.layer: s for s in self.plan.llm_stages}
            if any(nominal.get(s.layer, None) is None or nominal[s.layer].score_layer != s.score_layer for s in plan.llm_stages):
                raise ValueError(f"method {self.method.name!r} plans other decoder stages for {n} tokens than for {self.plan.n_visual}")
            self._plans[n, grid] = plan
        return self._plans[n, grid]

    def _planned(self, n: int, keep: int, grid: tuple[int, int] | None = None) -> Plan:
        plan = self.method.unit_plan(n, keep, self.num_layers, grid)
        if self.attention_layers is None:
            return plan
        return on_attention_layers(self.method, plan, self.attention_layers, self.num_layers)

    def schedule(self, plan: Plan, stages: tuple[LLMStage, ...]) -> list[int]:
        """A unit's visual tokens [from the encoder, entering the decoder, after each of `stages`] (the batch's
        stages: a unit keeps all its tokens at a stage its plan does not cut at)."""
        counts = [plan.n_visual, plan.vision_keep]
        own = {s.layer: s.keep for s in plan.llm_stages}
        for stage in stages:
            counts.append(own.get(stage.layer, counts[-1]))
        return counts


def batch_stages(budgets: list[Budget]) -> tuple[LLMStage, ...]:
    """The decoder stages of a batch whose prompts have their own budgets: every layer one of them cuts at."""
    stages = {}
    for budget in budgets:
        for stage in budget.plan.llm_stages:
            if stages.setdefault(stage.layer, stage).score_layer != stage.score_layer:
                raise ValueError(f"the prompts of this batch score their cut at layer {stage.layer} at different layers")
    ordered = tuple(stages[layer] for layer in sorted(stages))
    check_stages(ordered)
    return ordered


def check_stages(stages: tuple[LLMStage, ...]) -> None:
    """Each stage scores within the frame it cuts: no earlier cut may fall between its score layer and its layer."""
    previous = -1
    for stage in stages:
        if not previous < stage.score_layer <= stage.layer:
            raise ValueError(f"decoder stages {stages} overlap: each must score after the previous cut")
        previous = stage.layer


def on_attention_layers(method: Method, plan: Plan, attention_layers: tuple[int, ...], num_layers: int) -> Plan:
    """`plan` with every decoder stage scored at one of `attention_layers` (a hybrid decoder's softmax-attention
    layers; the others have no attention matrix to score with).

    A stage the method's own default puts elsewhere moves to the nearest such layer (the earlier one at a tie),
    its cut moving with it (FastV keeps cutting one layer after it scores): STAR's default becomes the
    full-attention layer nearest half the depth. A layer option the caller set that scores elsewhere is a
    ValueError naming the full-attention layers.
    """
    if all(stage.score_layer in attention_layers for stage in plan.llm_stages):
        return plan
    named = ", ".join(map(str, attention_layers))
    asked = [f.name for f in fields(method) if "layer" in f.name and getattr(method, f.name) != f.default]
    if asked:
        stage = next(s for s in plan.llm_stages if s.score_layer not in attention_layers)
        raise ValueError(
            f"{asked[0]}={getattr(method, asked[0])!r} makes {method.name!r} score a decoder stage with layer "
            f"{stage.score_layer}, a linear-attention layer with no attention to score with: the decoder's "
            f"full-attention layers are {named}"
        )
    moved = []
    try:
        for stage in plan.llm_stages:
            gap = stage.layer - stage.score_layer
            fits = [a for a in attention_layers if a + gap < num_layers]
            if not fits:
                raise ValueError
            score = min(fits, key=lambda a: (abs(a - stage.score_layer), a))
            moved.append(replace(stage, score_layer=score, layer=score + gap))
        check_stages(tuple(moved))
    except ValueError:
        raise ValueError(
            f"{method.name!r}'s default decoder stages {[s.score_layer for s in plan.llm_stages]} do not move onto "
            f"distinct full-attention layers ({named}): pass its layer option, scoring at those layers"
        ) from None
    return replace(plan, llm_stages=tuple(moved))
