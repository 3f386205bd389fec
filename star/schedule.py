"""Compute budgets: `flops=0.3` or `time=0.5` turned into a method's settings (keep and the options it picks).

A user thinks in compute, a method in tokens and layers. A *schedule* is a method's measured settings on one
model shape, each with its cost (decoder prefill FLOPs and prefill time, as fractions of the unpruned model's)
and its accuracy; a budget picks the most accurate setting that costs no more, which is a point of the
accuracy-versus-cost frontier. `star calibrate` measures a schedule on the user's data; `star/schedules/` ships
some (the default model's); without one, `by_formula` sets only what the FLOPs formula can decide.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Callable

from star.flops import DecoderShape, prefill_flops
from star.methods import Method, Plan, build
from star.pruner.budget import unit_keep
from star.synthetic import TEXT_TOKENS

COSTS = ("flops", "time")
# STAR's stage-1 ratio in the paper (section 4.1), which the formula keeps when no schedule was measured.
STAR_STAGE1_RATIO = 0.15
# The least budget the formula lets STAR's stage 2 keep before it moves the cut earlier: the paper's smallest,
# 29 of 576 tokens.
STAR_FLOOR = 29 / 576
# The stage-1 ratios the formula raises STAR's to, in order, where even stage 2 at layer 1 keeping one token costs
# more than the budget (a short prompt spends most of its FLOPs on the tokens entering the decoder); `star
# calibrate`'s grid measures the same ones.
STAR_RAISED_RATIOS = (0.3, 0.5)


class BudgetUnreachable(ValueError):
    """A budget below the cheapest setting a method has on a model: a comparison at equal cost skips that pair."""


@dataclass(frozen=True)
class Point:
    """One setting of a method and what it cost and scored; `options` are the ones the budget picks."""

    keep: int
    options: dict
    flops: float
    time: float | None = None
    accuracy: float | None = None
    interval: tuple[float, float] | None = None
    n: int | None = None

    def cost(self, kind: str) -> float | None:
        return self.flops if kind == "flops" else self.time


@dataclass(frozen=True)
class Schedule:
    """A method's measured settings on one model shape (its decoder and its visual tokens per image unit)."""

    method: str
    shape: dict
    text_tokens: float
    points: tuple[Point, ...]
    source: str

    @property
    def knobs(self) -> set[str]:
        """The options the schedule chooses (besides keep): those its points set."""
        return {name for point in self.points for name in point.options}

    def pick(self, kind: str, budget: float) -> Point:
        """The most accurate point whose `kind` cost is at most `budget` (the cheaper one on a tie)."""
        costed = [p for p in self.points if p.cost(kind) is not None and p.accuracy is not None]
        if not costed:
            raise ValueError(f"{kind}={budget} needs measured {kind} costs, and this schedule ({self.source}) has none")
        affordable = [p for p in costed if p.cost(kind) <= budget]
        if not affordable:
            least = min(p.cost(kind) for p in costed)
            raise BudgetUnreachable(f"{kind}={budget} is below every setting of this schedule ({self.source}): the cheapest costs {least:.3f}")
        return max(affordable, key=lambda p: (p.accuracy, -p.cost(kind)))

    def portable(self) -> Schedule:
        """The schedule without its times: FLOPs belong to the model, times to the machine that measured them, so a
        schedule shipped to other machines carries only the FLOPs."""
        points = tuple(dataclasses.replace(p, time=None) for p in self.points)
        return dataclasses.replace(self, points=points, source=self.source + "; times left out (they were this machine's)")

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> Schedule:
        """A schedule file, or a ValueError naming the file and what is wrong with it."""
        try:
            data = json.loads(Path(path).read_text())
            points = tuple(Point(**{**p, "interval": tuple(p["interval"]) if p.get("interval") else None}) for p in data.pop("points"))
            return cls(**data, points=points)
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as error:
            raise ValueError(f"schedule={str(path)!r} is not a schedule file that `star calibrate` writes ({error})") from None


def frontier(points: list[Point], kind: str = "flops") -> list[Point]:
    """The points no other point beats: by increasing cost, each more accurate than every cheaper one."""
    ordered = sorted((p for p in points if p.cost(kind) is not None and p.accuracy is not None), key=lambda p: (p.cost(kind), -p.accuracy))
    best, kept = float("-inf"), []
    for point in ordered:
        if point.accuracy > best:
            kept.append(point)
            best = point.accuracy
    return kept


def shape_key(shape: DecoderShape, n_visual: int) -> dict:
    """What a schedule must match to apply to a model: its decoder's shape and its visual tokens per image unit, as
    JSON holds them (lists for tuples). Linear-attention layers and per-layer heads only where a decoder has them:
    one without is keyed as before they were modelled."""
    key = dataclasses.asdict(shape)
    if key["linear"] is None:
        del key["linear"]
    if not key["layer_heads"]:
        del key["layer_heads"]
    return json.loads(json.dumps({**key, "n_visual": n_visual}))


def shipped(method: str, key: dict) -> Schedule | None:
    """The schedule shipped for this method on a model of this shape, if any."""
    for path in sorted(files("star").joinpath("schedules").iterdir()):
        if path.name.endswith(".json"):
            schedule = Schedule.load(path)
            if schedule.method == method and schedule.shape == key:
                return schedule
    return None


def flops_ratio(shape: DecoderShape, plan: Plan, n_text: float, images: int = 1) -> float:
    """Decoder prefill FLOPs of a prompt of n_text other tokens and `images` images pruned by one image's plan,
    over the unpruned prefill's."""
    return units_ratio(shape, [plan] * images, n_text)


def units_ratio(shape: DecoderShape, plans: list[Plan], n_text: float) -> float:
    """Decoder prefill FLOPs of a prompt of n_text other tokens (text, and image tokens never pruned: LLaVA-NeXT's
    newlines) and one unit per plan (an image, a crop, a tile grid), each pruned by its own plan, over the unpruned
    prefill's. A unit keeps all it has at a layer its plan does not cut at."""
    per_layer = [n_text] * shape.num_layers
    for plan in plans:
        cuts = {stage.layer: stage.keep for stage in plan.llm_stages}
        visual = plan.vision_keep
        for layer in range(shape.num_layers):
            visual = cuts.get(layer, visual)
            per_layer[layer] += visual
    return prefill_flops(shape, per_layer) / prefill_flops(shape, [n_text + sum(p.n_visual for p in plans)] * shape.num_layers)


def by_formula(
    method: str, options: dict, shape: DecoderShape, n_visual: int, n_text: float, budget: float, images: int = 1,
    units: tuple[int, ...] | None = None, budget_unit: int | None = None,
) -> Point:
    """The setting the FLOPs formula alone gives for `budget` (a fraction of the unpruned prefill FLOPs), for a prompt
    of n_text other tokens and `images` images of n_visual tokens, or of `units` of their own sizes, where keep counts
    per `budget_unit` tokens (LLaVA-NeXT's crops shown in part; see `unit_plans`).

    Every method: the largest keep whose plan, under the given options, costs at most the budget. STAR, whose
    layer and stage-1 ratio are free: the paper's defaults (stage 1 drops 15%, stage 2 at half depth) with the
    largest keep that fits; above what stage 1 alone costs, stage 1 drops less; below what stage 2 at half depth
    costs at the paper's least budget (29/576 of the tokens), stage 2 moves earlier, to the deepest layer where
    that budget fits; below stage 2 at layer 1 keeping one token, stage 1 drops more (STAR_RAISED_RATIOS). No
    accuracy decides any of it: a measured schedule (`star calibrate`) does better.
    """
    groups = _star_groups(n_visual, shape.num_layers) if method == "star" else [(range(1, n_visual + 1), lambda keep: {})]
    units = units or (n_visual,) * images
    for keeps, chosen in groups:

        def cost(keep: int) -> float:
            return units_ratio(shape, unit_plans(build(method, **options, **chosen(keep)), keep, units, budget_unit, shape.num_layers), n_text)

        fitting = bisect.bisect_right(keeps, budget, key=cost)  # cost grows with keep within a group
        if fitting:
            keep = keeps[fitting - 1]
            # the count the plan keeps: a method that reaches only some counts (Pool's grids) rounds keep to one
            reached = build(method, **options, **chosen(keep)).plan(n_visual, keep, shape.num_layers).final_keep
            return Point(keep=reached, options=chosen(keep), flops=cost(keep))
    least = {"keep": keeps[0], **chosen(keeps[0])}
    raise BudgetUnreachable(
        f"flops={budget} is below what {method} reaches on this model: its least is {cost(keeps[0]):.3f}, at "
        + ", ".join(f"{name}={value}" for name, value in least.items())
    )


def unit_plans(method: Method, keep: int, units: tuple[int, ...], budget_unit: int | None, num_layers: int) -> list[Plan]:
    """The plan of each unit of a prompt, `keep` counting per `budget_unit` tokens (a unit of fewer keeps its
    share, as `star.pruner.budget.unit_keep` gives it; None: per unit)."""
    return [method.plan(n, unit_keep(keep, n, budget_unit), num_layers) for n in units]


def _star_groups(n_visual: int, num_layers: int) -> list[tuple[range, Callable[[int], dict]]]:
    """STAR's settings in the order the formula prefers them: (keeps, ascending; the options for a keep)."""
    entering = round((1 - STAR_STAGE1_RATIO) * n_visual)
    floor = max(1, round(STAR_FLOOR * n_visual))
    groups = [(range(entering, n_visual + 1), lambda keep: {"stage1_ratio": round(1 - keep / n_visual, 6)})]
    for ratio in (STAR_STAGE1_RATIO, *STAR_RAISED_RATIOS):
        entering = round((1 - ratio) * n_visual)
        for layer in range(num_layers // 2, 0, -1):
            keeps = range(floor if layer > 1 else 1, entering)
            groups.append((keeps, lambda keep, layer=layer, ratio=ratio: {"layer": layer, "stage1_ratio": ratio}))
    return groups


@dataclass(frozen=True)
class PromptBudget:
    """A FLOPs budget resolved per prompt, at prefill: each prompt gets the setting for its own text tokens and
    images, so its prefill costs at most `fraction` of its own unpruned prefill. (A setting picked once for one
    prompt length overshoots on longer prompts and refuses budgets that shorter ones reach.)

    schedule: the measured settings to pick from, each re-costed for the prompt; None: the formula (`by_formula`).
    budget_unit: what keep counts per where a prompt's units differ in size (LLaVA-NeXT's 576-token crops, of
    which the prompt may show a part; LLaVA-OneVision's 729-token base crop and its tile grid); None: per unit.
    """

    method: str
    options: dict
    fraction: float
    shape: DecoderShape
    n_visual: int
    schedule: Schedule | None
    budget_unit: int | None = None
    picked: dict[tuple, Point] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def pick(self, n_text: int, images: int = 1, units: tuple[int, ...] | None = None) -> Point:
        """The setting for a prompt of n_text other tokens and `images` images of n_visual tokens each (or `units`
        of their own sizes), searched once per lengths: every prefill asks for each of its prompts', and the
        formula's search costs milliseconds."""
        units = tuple(sorted(units)) if units is not None else (self.n_visual,) * images
        if (n_text, units) not in self.picked:
            self.picked[n_text, units] = self._search(n_text, units)
        return self.picked[n_text, units]

    def _search(self, n_text: int, units: tuple[int, ...]) -> Point:
        if self.schedule is None:
            return by_formula(self.method, self.options, self.shape, self.n_visual, n_text, self.fraction, units=units, budget_unit=self.budget_unit)
        points = tuple(
            dataclasses.replace(p, flops=units_ratio(self.shape, self.unit_plans(p, units), n_text)) for p in self.schedule.points
        )
        return dataclasses.replace(self.schedule, points=points).pick("flops", self.fraction)

    def unit_plans(self, point: Point, units: tuple[int, ...]) -> list[Plan]:
        return unit_plans(build(self.method, **self.options, **point.options), point.keep, units, self.budget_unit, self.shape.num_layers)

    def nominal(self) -> Point:
        """The pick `pruner.keep` and `pruner.method` show: the schedule's at the costs it measured, or the formula's
        for a prompt of TEXT_TOKENS text tokens; where that cannot reach the budget, a prompt without text's (a
        budget no prompt reaches is refused here)."""
        try:
            return self.pick(TEXT_TOKENS) if self.schedule is None else self.schedule.pick("flops", self.fraction)
        except BudgetUnreachable:
            return self.pick(0)

    def plan(self, point: Point) -> Plan:
        return build(self.method, **self.options, **point.options).plan(self.n_visual, point.keep, self.shape.num_layers)

    def first_layer(self) -> int | None:
        """The first decoder layer any prompt's pick scores at (the pruner hooks the layers from there on)."""
        if self.schedule is not None:
            points = self.schedule.points
        else:  # a pick's stages only move earlier as its keep falls; STAR's reach layer 1
            points = (Point(keep=1, options={"layer": 1} if self.method == "star" else {}, flops=0.0),)
        return min((s.score_layer for p in points for s in self.plan(p).llm_stages), default=None)


def pick_per_prompt(
    budget: PromptBudget, real_tokens: list[int], image_tokens: list[int], units: list[list[int]] | None = None,
) -> list[Point]:
    """Each prompt's setting from its lengths, or a BudgetUnreachable naming the first prompt that no setting fits
    and its lengths. units: each prompt's units (their visual tokens), where they differ in size; its other tokens
    are its real tokens but those. Without them, every image token is a visual token of a unit of n_visual."""
    picks = []
    for row, (real, image) in enumerate(zip(real_tokens, image_tokens)):
        own = None if units is None else tuple(units[row])
        n_text = real - (image if own is None else sum(own))
        what = f"{image // budget.n_visual} image(s) of {budget.n_visual}" if own is None else f"units of {', '.join(map(str, own)) or 'no'}"
        try:
            picks.append(budget.pick(n_text, image // budget.n_visual, own))
        except BudgetUnreachable as error:
            raise BudgetUnreachable(f"prompt {row} of the batch ({n_text} text tokens, {what} visual tokens): {error}") from None
    return picks


def resolve_budget(
    method: str, options: dict, keep, kind: str, budget, schedule, shape: DecoderShape, n_visual: int | None, model_name: str,
    text_tokens: float | None = None,
) -> tuple[Point, str]:
    """The setting a compute budget picks for `method` on a model, once, and where the choice came from.

    schedule: a Schedule, a path to one, or None for the one shipped for this model's shape, else the formula,
    for prompts of `text_tokens` text tokens (default TEXT_TOKENS). `prompt_budget` picks per prompt instead.
    Every argument is checked before any compute, each error naming the argument and what is allowed.
    """
    schedule = _checked(method, options, keep, kind, budget, schedule, shape, n_visual, model_name, text_tokens)
    if schedule is None:
        text = TEXT_TOKENS if text_tokens is None else text_tokens
        return by_formula(method, options, shape, n_visual, text, float(budget)), f"the FLOPs formula, at {text} text tokens"
    return schedule.pick(kind, float(budget)), schedule.source


def prompt_budget(
    method: str, options: dict, keep, budget, schedule, shape: DecoderShape, n_visual: int | None, model_name: str,
    budget_unit: int | None = None,
) -> PromptBudget:
    """A FLOPs budget to pick per prompt at prefill (see `PromptBudget`), its arguments checked as `resolve_budget`
    checks them, and refused here where no prompt reaches it."""
    checked = _checked(method, options, keep, "flops", budget, schedule, shape, n_visual, model_name)
    resolved = PromptBudget(method, options, float(budget), shape, n_visual, checked, budget_unit)
    resolved.nominal()
    return resolved


def _checked(
    method: str, options: dict, keep, kind: str, budget, schedule, shape: DecoderShape, n_visual: int | None, model_name: str,
    text_tokens: float | None = None,
) -> Schedule | None:
    """The schedule a budget picks from (None: the formula), once every argument is checked."""
    if keep is not None:
        raise ValueError(f"keep={keep!r} and {kind}={budget!r} are both given: a budget is tokens or compute, give one")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"{kind}={budget!r} is not a budget: give the fraction of the unpruned model's prefill {kind} in (0, 1]")
    if text_tokens is not None and (isinstance(text_tokens, bool) or not isinstance(text_tokens, (int, float)) or text_tokens < 0):
        raise ValueError(f"text_tokens={text_tokens!r} is not a prompt length: give the text tokens besides the image, a number >= 0")
    if n_visual is None:
        raise ValueError(
            f"{kind}= needs the same number of visual tokens in every image, and {model_name}'s images differ in size: give keep= instead"
        )
    key = shape_key(shape, n_visual)
    if schedule is not None and not isinstance(schedule, Schedule):
        schedule = Schedule.load(schedule)
    schedule = schedule or shipped(method, key)
    if schedule is None:
        if kind == "time":
            raise ValueError(f"time= needs a schedule with measured times for {method} on this model: run `star calibrate` and pass schedule=FILE")
        _check_free(options, {"layer", "stage1_ratio"} if method == "star" else set(), kind, budget)
        return None
    if schedule.method != method:
        raise ValueError(f"schedule is for method {schedule.method!r}, not method={method!r}")
    if schedule.shape != key:
        changed = ", ".join(f"{k}: {schedule.shape.get(k)} there, {key.get(k)} here" for k in sorted(set(key) | set(schedule.shape)) if schedule.shape.get(k) != key.get(k))
        raise ValueError(f"schedule ({schedule.source}) was measured on another model shape ({changed})")
    _check_free(options, schedule.knobs, kind, budget)
    return schedule


def _check_free(options: dict, knobs: set[str], kind: str, budget: float) -> None:
    """A budget picks `knobs`: giving one of them too is a contradiction, named."""
    if clash := sorted(set(options) & knobs):
        raise ValueError(
            f"{clash[0]}={options[clash[0]]!r} and {kind}={budget!r} are both given: the budget picks {', '.join(sorted(knobs))}; "
            f"give the options with keep=, or the budget alone"
        )
