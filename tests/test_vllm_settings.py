"""The vLLM plugin's settings, checked without vLLM (star.integrations.vllm imports none of it): what runs, what
is refused and why, and the overrides helper. The engine itself is tested in tests_vllm/ (make test-vllm)."""

from __future__ import annotations

import json

import pytest

from star import compat
from star.integrations.vllm import CUT_ENGINE, engine_args, hf_overrides, parse_setting, server_flags, vision_methods


def test_vision_side_methods_are_those_without_a_decoder_stage():
    assert vision_methods() == ["fastervlm", "visionzip", "vispruner", "divprune", "random", "pool", "star-vision"]


@pytest.mark.parametrize(
    "raw, keep",
    [
        ({"method": "star-vision", "keep": 39}, 39),
        ({"method": "fastervlm", "keep": 0.5}, 98),
        ({"method": "visionzip", "keep": 20, "contextual_ratio": 0.25}, 20),
        ({"method": "none", "keep": 196}, 196),
        ({"method": "star", "keep": 180}, 180),  # at this budget STAR has no decoder stage: stage 1 alone keeps 180
        ({"method": "fastv", "keep": 196}, 196),  # nothing to cut
    ],
)
def test_a_setting_keeps_what_the_method_plans(raw, keep):
    setting = parse_setting(raw, 196, 30, "here")
    assert setting.keep == keep
    assert json.loads(setting.text) == raw


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"method": "star", "keep": 39}, "here: method='star' at keep=39 prunes inside the decoder (a cut before layer 15)"),
        ({"method": "star", "keep": 39}, "method 'star-vision' runs STAR's vision stage at the same final budget"),
        ({"method": "fastv", "keep": 39}, "vision-side methods run instead: fastervlm, visionzip, vispruner, divprune, random, pool, star-vision"),
        ({"method": "pdrop", "keep": 39}, "prunes inside the decoder"),
        ({"method": "sparsevlm", "keep": 39}, "prunes inside the decoder"),
        ({"method": "dart", "keep": 39}, "prunes inside the decoder"),
        ({"method": "cdpruner", "keep": 39}, "method='cdpruner' weighs the visual tokens by the prompt's instruction, and vLLM's encoder step never sees"),
        ({"method": "fastervlm", "keep": 197}, "here: keep=197 is outside [1, 196]"),
        ({"method": "fastervlm", "keep": 0}, "keep=0 is outside [1, 196]"),
        ({"method": "visionzip", "keep": 20, "contextual_ratio": 1.5}, "contextual_ratio=1.5 is not a ratio in [0, 1)"),
        ({"method": "random", "keep": 20, "layer": 3}, "option 'layer' is not accepted by method 'random'"),
        ({"method": 3, "keep": 20}, "method=3 is unknown"),
        ({"keep": 20}, "must be a dict with 'method', 'keep'"),
        ("fastervlm", "must be a dict"),
    ],
)
def test_a_bad_setting_names_where_it_came_from_and_what_is_allowed(raw, message):
    with pytest.raises(ValueError) as error:
        parse_setting(raw, 196, 30, "here")
    assert message in str(error.value)


def test_overrides_name_the_pruned_architecture():
    assert hf_overrides("fastervlm", 98) == {
        "architectures": ["StarLlavaForConditionalGeneration"], "star": {"method": "fastervlm", "keep": 98}
    }
    assert hf_overrides("star-vision", 0.25, architecture="Qwen2_5_VLForConditionalGeneration")["architectures"] == [
        "StarQwen2_5_VLForConditionalGeneration"
    ]
    assert hf_overrides("star-vision", 0.25, architecture="Qwen3_5ForConditionalGeneration")["architectures"] == [
        "StarQwen3_5ForConditionalGeneration"
    ]
    with pytest.raises(ValueError, match="architecture='InternVLForConditionalGeneration' is not served: no pruned vLLM class for it yet"):
        hf_overrides("star-vision", 0.25, architecture="InternVLForConditionalGeneration")
    with pytest.raises(ValueError, match="option 'seed' is not accepted by method 'fastervlm'"):
        hf_overrides("fastervlm", 98, seed=1)


def test_llava_next_overrides_and_its_budget_per_crop():
    """LLaVA-NeXT's class, and what a crop keeps: `keep` when shown whole, its share of the patches a cut tile
    shows, as star.apply's `unit_keep` counts (a fraction applies to each)."""
    assert hf_overrides("fastervlm", 98, architecture="LlavaNextForConditionalGeneration")["architectures"] == [
        "StarLlavaNextForConditionalGeneration"
    ]
    count = parse_setting({"method": "fastervlm", "keep": 98}, 576, 32, "here")
    assert [count.unit_keep(n) for n in (576, 432, 288, 3)] == [98, 74, 49, 1]
    fraction = parse_setting({"method": "star-vision", "keep": 0.25}, 576, 32, "here")
    assert [fraction.unit_keep(n) for n in (576, 432, 2)] == [144, 108, 1]


@pytest.mark.parametrize(
    "raw, vision_keep, cut",
    [
        ({"method": "star", "keep": 39}, 167, (15, 39, 15)),  # stage 1 keeps 85%, the cut at half the depth keeps 39
        ({"method": "fastv", "keep": 39, "layer": 3}, 196, (3, 39, 2)),
        ({"method": "dart", "keep": 20}, 196, (2, 20, 1)),
        ({"method": "pdrop", "keep": 39, "layers": [8]}, 196, (8, 39, 8)),
        ({"method": "star", "keep": 180}, 180, None),  # no cut at this budget
    ],
)
def test_an_engine_setting_may_cut_once_inside_the_decoder(raw, vision_keep, cut):
    setting = parse_setting(raw, 196, 30, "here", cuts=True)
    assert setting.keep == vision_keep
    assert (setting.cut and (setting.cut.layer, setting.cut.keep, setting.cut.score_layer)) == cut


def test_more_than_one_cut_is_refused_naming_the_layers_and_what_runs():
    with pytest.raises(ValueError) as error:
        parse_setting({"method": "pdrop", "keep": 39}, 196, 32, "here", cuts=True)
    assert "here: method='pdrop' at keep=39 cuts before 3 decoder layers [8, 16, 24]" in str(error.value)
    assert "the plugin serves one cut" in str(error.value) and "'layers'" in str(error.value)


def test_engine_args_add_the_cut_options_only_for_a_method_that_cuts():
    assert engine_args("fastervlm", 98) == {"hf_overrides": hf_overrides("fastervlm", 98)}
    assert engine_args("star", 39) == {"hf_overrides": hf_overrides("star", 39), **CUT_ENGINE}
    assert "scheduler_cls" not in engine_args("star", 39, "LlavaNextForConditionalGeneration")  # refused by the engine
    assert server_flags(CUT_ENGINE) == [
        "--scheduler-cls", "star.integrations.vllm.cut.CutScheduler", "--no-enable-chunked-prefill",
        "--no-enable-prefix-caching",
    ]


@pytest.mark.skipif(bool(compat.QWEN3_5_MISSING), reason=str(compat.QWEN3_5_MISSING))
def test_a_decoder_cut_on_qwen3_5_is_refused_saying_why():
    """Its hybrid decoder is never cut: an engine's setting (or a request's) that would cut is refused, with the reason."""
    from transformers import AutoConfig

    from star.integrations.vllm import config_setting, engine_args

    config = AutoConfig.for_model("qwen3_5")
    for cuts in (None, False):  # the engine's setting, a request's
        with pytest.raises(ValueError, match="prunes inside the decoder .*; Qwen3.5's decoder is never cut here: its linear-attention layers"):
            config_setting({"method": "star", "keep": 4}, config, "here", cuts=cuts)
    assert config_setting({"method": "star-vision", "keep": 4}, config, "here").cut is None
    assert "scheduler_cls" not in engine_args("star", 4, "Qwen3_5ForConditionalGeneration")


def test_pool_is_served_on_every_family_its_counts_and_grids_from_each_units_grid():
    """pool's placeholder count and the grid whose positions its tokens take, known before the encoder from the
    setting and the unit's grid (a Qwen image, a LLaVA-NeXT tile that unpadding cuts), as `Pool.unit_plan` gives them."""
    from transformers import AutoConfig

    from star.integrations.vllm import FAMILIES, config_setting, engine_setting

    for family in FAMILIES:
        if family.model_type == "qwen3_5" and compat.QWEN3_5_MISSING:
            continue
        config = AutoConfig.for_model(family.model_type)
        config.star = {"method": "pool", "keep": 64}
        assert engine_setting(config).method.name == "pool", family.architecture
    assert config_setting({"method": "pool", "keep": 64}, AutoConfig.for_model("llava"), "here").keep == 64
    qwen = AutoConfig.for_model("qwen2_5_vl")
    for keep, grids in ((6, {(6, 4): (3, 2), (4, 8): (2, 4), (4, 4): (2, 2)}), (0.6, {(6, 4): (4, 3), (4, 8): (3, 6), (4, 4): (3, 3)})):
        setting = config_setting({"method": "pool", "keep": keep}, qwen, "here")
        for (rows, columns), (g_h, g_w) in grids.items():
            assert setting.kept_grid(rows * columns, (rows, columns)) == (g_h, g_w)
            assert setting.unit_keep(rows * columns, (rows, columns)) == g_h * g_w
    assert config_setting({"method": "star-vision", "keep": 6}, qwen, "here").kept_grid(24, (6, 4)) == (6, 4)
    next_ = config_setting({"method": "pool", "keep": 0.5}, AutoConfig.for_model("llava_next"), "here")
    assert next_.keep == 289 and next_.unit_keep(12, (3, 4)) == 6  # a crop of 24 x 24 to 17 x 17; a cut tile's 6 to 2 x 3
