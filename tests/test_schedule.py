"""Compute budgets (star.schedule): a frontier point for flops= / time=, the formula without a schedule, and
every contradiction refused before compute."""

from __future__ import annotations

import pytest
from conftest import N_VISUAL, batch, prompt_ids, tiny_llava

import star
from star.flops import DecoderShape, LinearAttention, layer_flops, prefill_flops
from star.methods import build
from star.schedule import STAR_FLOOR, Point, Schedule, by_formula, flops_ratio, frontier, shape_key, shipped

SHAPE = DecoderShape.named("llava-1.5-7b")


def points() -> list[Point]:
    return [
        Point(keep=576, options={}, flops=1.0, time=1.0, accuracy=0.90),
        Point(keep=58, options={"layer": 16}, flops=0.55, time=0.60, accuracy=0.85),
        Point(keep=58, options={"layer": 8}, flops=0.35, time=0.45, accuracy=0.80),
        Point(keep=29, options={"layer": 8}, flops=0.33, time=0.44, accuracy=0.70),
        Point(keep=29, options={"layer": 4}, flops=0.20, time=0.50, accuracy=0.80),  # slower than its FLOPs say
    ]


def test_frontier_keeps_the_points_no_cheaper_point_beats():
    assert [(p.keep, p.options) for p in frontier(points(), "flops")] == [(29, {"layer": 4}), (58, {"layer": 16}), (576, {})]
    assert [(p.keep, p.options) for p in frontier(points(), "time")] == [(29, {"layer": 8}), (58, {"layer": 8}), (58, {"layer": 16}), (576, {})]


def test_pick_is_the_most_accurate_affordable_point_and_the_cheaper_on_a_tie():
    schedule = Schedule("star", {}, 79, tuple(points()), "test")
    assert schedule.pick("flops", 0.5) == points()[4]  # 0.80 at 0.20 beats 0.80 at 0.35
    assert schedule.pick("flops", 0.6) == points()[1]
    assert schedule.pick("time", 0.45) == points()[2]
    with pytest.raises(ValueError, match=r"flops=0.1 is below every setting .* the cheapest costs 0.200"):
        schedule.pick("flops", 0.1)


def brute_force_keep(method: str, budget: float, n_text: int, **options) -> int:
    """The largest keep whose plan fits, by trying every keep (not the bisection the code uses)."""
    fits = [k for k in range(1, 577) if flops_ratio(SHAPE, build(method, **options).plan(576, k, SHAPE.num_layers), n_text) <= budget]
    return max(fits)


@pytest.mark.parametrize("method", ["fastv", "fastervlm", "pdrop", "sparsevlm"])
@pytest.mark.parametrize("budget", [0.45, 0.7, 0.95])
def test_formula_gives_every_method_the_largest_keep_that_fits(method, budget):
    point = by_formula(method, {}, SHAPE, 576, 79, budget)
    assert point.keep == brute_force_keep(method, budget, 79) and point.options == {} and point.flops <= budget


def test_formula_flops_ratio_is_the_papers_formula():
    plan = build("fastv").plan(576, 64, SHAPE.num_layers)  # 576 tokens in layers 0-1, 64 from layer 2 (K=2)
    by_hand = (2 * layer_flops(SHAPE, 79 + 576) + 30 * layer_flops(SHAPE, 79 + 64)) / (32 * layer_flops(SHAPE, 79 + 576))
    assert flops_ratio(SHAPE, plan, 79) == pytest.approx(by_hand, rel=1e-12)


def test_formula_for_star_scales_the_papers_defaults():
    stage1_alone = flops_ratio(SHAPE, build("star").plan(576, 490, 32), 79)  # 15% dropped, no stage 2
    above = by_formula("star", {}, SHAPE, 576, 79, (stage1_alone + 1) / 2)
    assert "layer" not in above.options and above.keep > 490 and above.options["stage1_ratio"] < 0.15
    assert above.keep == max(k for k in range(490, 577) if flops_ratio(SHAPE, build("star", stage1_ratio=1 - k / 576).plan(576, k, 32), 79) <= (stage1_alone + 1) / 2)
    mid = by_formula("star", {}, SHAPE, 576, 79, 0.7)
    assert mid.options == {"layer": 16, "stage1_ratio": 0.15} and mid.keep == brute_force_keep("star", 0.7, 79, layer=16)
    low = by_formula("star", {}, SHAPE, 576, 79, 0.3)
    floor = round(STAR_FLOOR * 576)
    layer = low.options["layer"]
    assert low.keep >= floor and low.keep == brute_force_keep("star", 0.3, 79, layer=layer)
    deeper = build("star", layer=layer + 1).plan(576, floor, 32)
    assert flops_ratio(SHAPE, deeper, 79) > 0.3  # one layer deeper, the paper's least budget no longer fits
    raised = by_formula("star", {}, SHAPE, 576, 79, 0.14)  # below stage 2 at layer 1 keeping 1 token (0.143)
    assert raised.options == {"layer": 1, "stage1_ratio": 0.3} and raised.flops <= 0.14
    with pytest.raises(ValueError, match=r"flops=0.1 is below what star reaches on this model: its least is 0.133, at keep=1, layer=1, stage1_ratio=0.5"):
        by_formula("star", {}, SHAPE, 576, 79, 0.1)


def test_apply_with_flops_prunes_to_the_formulas_setting_and_costs_what_it_says():
    model = tiny_llava(layers=8)
    shape = DecoderShape.from_config(model.config.text_config)
    text = star.synthetic.TEXT_TOKENS
    expected = by_formula("star", {}, shape, N_VISUAL, text, 0.9)
    inputs = batch([prompt_ids(text - 10, 10, seed=0)])
    with star.apply(model, flops=0.9) as pruner:  # 16 visual tokens beside 79 text ones: 0.83 at the least
        model(**inputs)
        assert (pruner.keep, pruner.method.layer, pruner.method.stage1_ratio) == (expected.keep, expected.options["layer"], 0.15)
        measured = pruner.stats.flops
    unpruned = prefill_flops(shape, [text + N_VISUAL] * shape.num_layers)
    assert measured / unpruned == pytest.approx(expected.flops, rel=1e-9) and expected.flops <= 0.9 and "layer" in expected.options


def test_apply_with_a_schedule_file_takes_its_point(tmp_path):
    model = tiny_llava(layers=8)
    key = shape_key(DecoderShape.from_config(model.config.text_config), N_VISUAL)
    chosen = [Point(keep=4, options={"layer": 2, "stage1_ratio": 0.25}, flops=0.4, time=0.5, accuracy=0.8), Point(keep=16, options={"stage1_ratio": 0}, flops=1.0, time=1.0, accuracy=0.9)]
    Schedule("star", key, 20, tuple(chosen), "a test schedule").save(tmp_path / "s.json")
    with star.apply(model, flops=0.6, schedule=tmp_path / "s.json") as pruner:
        assert (pruner.keep, pruner.method.layer, pruner.method.stage1_ratio) == (4, 2, 0.25)
    with star.apply(model, time=1.0, schedule=str(tmp_path / "s.json")) as pruner:
        assert (pruner.keep, pruner.method.stage1_ratio) == (16, 0)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"keep": 20, "flops": 0.3}, r"keep=20 and flops=0.3 are both given"),
        ({"flops": 0.3, "time": 0.4}, r"flops=0.3 and time=0.4 are both given"),
        ({"flops": 0}, r"flops=0 is not a budget: give the fraction .* in \(0, 1\]"),
        ({"flops": 1.5}, r"flops=1.5 is not a budget"),
        ({"flops": True}, r"flops=True is not a budget"),
        ({"time": 0.5}, r"time= needs a schedule with measured times for star"),
        ({"flops": 0.5, "layer": 3}, r"layer=3 and flops=0.5 are both given: the budget picks layer, stage1_ratio"),
        ({"schedule": "s.json"}, r"schedule='s.json' is given without a budget: add flops= or time="),
        ({"flops": 0.5, "schedule": "missing.json"}, r"schedule='missing.json' is not a schedule file"),
        ({"method": "fastv", "flops": 0.01}, r"flops=0.01 is below what fastv reaches on this model: its least is"),
    ],
)
def test_budget_errors_name_the_arguments_before_any_compute(arguments, message):
    model = tiny_llava()
    with pytest.raises(ValueError, match=message):
        star.apply(model, **arguments)
    assert getattr(model, "_star_pruner", None) is None


def test_a_schedule_of_another_method_or_shape_is_refused(tmp_path):
    model = tiny_llava(layers=8)
    key = shape_key(DecoderShape.from_config(model.config.text_config), N_VISUAL)
    point = (Point(keep=4, options={}, flops=0.4, accuracy=0.8),)
    Schedule("fastv", key, 20, point, "fastv's").save(tmp_path / "fastv.json")
    Schedule("star", {**key, "num_layers": 32}, 20, point, "another model's").save(tmp_path / "other.json")
    with pytest.raises(ValueError, match=r"schedule is for method 'fastv', not method='star'"):
        star.apply(model, flops=0.5, schedule=tmp_path / "fastv.json")
    with pytest.raises(ValueError, match=r"measured on another model shape \(num_layers: 32 there, 8 here\)"):
        star.apply(model, flops=0.5, schedule=tmp_path / "other.json")


def test_flops_on_a_family_whose_images_differ_in_size_is_refused():
    from families import tiny_qwen

    with pytest.raises(ValueError, match=r"flops= needs the same number of visual tokens in every image, and Qwen2VLForConditionalGeneration"):
        star.apply(tiny_qwen(), flops=0.5)


def test_a_shape_key_is_what_a_saved_schedule_holds(tmp_path):
    """Linear-attention layers (Qwen3.5) and per-layer heads (Gemma 4) are keyed as JSON holds them, so a schedule
    saved for such a decoder matches it when loaded; a decoder without either is keyed without them."""
    plain = DecoderShape(64, 128, 2, 4, 2, 16)
    assert set(shape_key(plain, 9)) == {"hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "gated_ffn", "n_visual"}
    linear = LinearAttention(("linear_attention", "full_attention"), 2, 4, 8, 8, 4)
    both = DecoderShape(64, 128, 2, 4, 2, 16, linear=linear, layer_heads=((2, 16), (1, 32)))
    schedule = Schedule("star", shape_key(both, 9), 79.0, (Point(4, {}, 0.5, accuracy=0.5, n=10),), "calibrated")
    schedule.save(tmp_path / "s.json")
    assert Schedule.load(tmp_path / "s.json").shape == shape_key(both, 9) != shape_key(plain, 9)


def test_the_default_models_shipped_schedule_is_found_by_its_shape():
    from transformers import AutoConfig

    from star.checks import _default_model_config
    from star.zoo import build_default_model

    built = AutoConfig.from_pretrained(build_default_model()).get_text_config()
    key = shape_key(DecoderShape.from_config(built), 196)
    assert shape_key(DecoderShape.from_config(_default_model_config().get_text_config()), 196) == key  # before the build too
    schedule = shipped("star", key)
    assert schedule is not None and schedule.method == "star" and len(frontier(list(schedule.points))) >= 3
    assert all(0 < p.flops <= 1 and p.accuracy is not None and p.n and p.time is None for p in schedule.points)
    assert shipped("star", {**key, "n_visual": 195}) is None
    from star.checks import model_skeleton

    picked = schedule.pick("flops", 0.3)
    with star.apply(model_skeleton(None), flops=0.3) as pruner:  # the shipped schedule, not the formula
        assert (pruner.keep, pruner.method.layer, pruner.method.stage1_ratio) == (picked.keep, picked.options["layer"], picked.options["stage1_ratio"])


def test_no_method_option_shares_a_name_with_an_apply_argument():
    """A method option named like one of apply's own arguments could never be given (apply would take it)."""
    import dataclasses
    import inspect

    from star.methods import REGISTRY

    own = {name for name, p in inspect.signature(star.apply).parameters.items() if p.kind is not p.VAR_KEYWORD}
    shadowed = {(name, f.name) for name, cls in REGISTRY.items() for f in dataclasses.fields(cls) if f.name in own}
    assert not shadowed
