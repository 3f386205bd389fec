"""LLaVA-OneVision: the core's reference tests, with base crops and tile grids (unpadded, resized) as the units
of stage 1, newline tokens kept, no [CLS], and prompts of several images as base crops alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import star
from families import IMAGE_TOKEN, assert_batch_equals_each_alone, forward_kept, greedy_by_recompute, kept_of, layout_of
from star.checks import check_setting, model_skeleton
from star.scoring import top_k_in_order
from tiled_families import CROP, onevision_inputs, prompt_embeds, rows_alone, tiny_onevision

NO_CLS = [m for m in star.methods() if m not in ("fastervlm", "visionzip")]
SELECTING = ["star", "fastv", "pdrop", "random"]
# WIDE: a 1 x 2 tile grid unpadded to 2 of its 4 patch rows (16 tokens); SQUARE: a 2 x 2 grid of 8 x 8 patches,
# resized to 5 x 5 (anyres_max_2); MEDIUM: a 1 x 2 grid shown in full (32 tokens).
WIDE, SQUARE, MEDIUM = (20, 70), (64, 64), (40, 70)


@pytest.fixture(scope="module")
def model():
    return tiny_onevision()


@torch.no_grad()
@pytest.mark.parametrize("method", NO_CLS)
def test_full_budget_equals_unpatched_model_and_remove_restores_it(model, method):
    inputs = onevision_inputs(model, [[WIDE], [SQUARE], [MEDIUM, WIDE]], [(3, 6), (1, 2), (2, 2)])
    before = model(**inputs).logits
    options = {"stage1_ratio": 0.0} if method == "star" else {}
    with star.apply(model, method=method, keep=CROP, **options):
        pruned = model(**inputs).logits
    after = model(**inputs).logits
    assert (pruned - before).abs().max() < 1e-5
    assert torch.equal(after, before)
    assert not model._forward_pre_hooks and not any(l._forward_pre_hooks for l in model.model.language_model.layers)


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("method", SELECTING)
def test_pruned_prefill_equals_forward_over_kept_tokens(model, method, positions):
    inputs = onevision_inputs(model, [[SQUARE]], [(3, 6)])
    with star.apply(model, method=method, keep=5, positions=positions) as pruner:
        logits = model(**inputs).logits[0, -1]
        stats = pruner.stats
    ids, embeds, pos, fixed = prompt_embeds(model, inputs, 0)
    expected = forward_kept(model, ids, embeds, pos, fixed, kept_of(stats, 0), stats.layers, contiguous=positions == "contiguous")
    assert (logits - expected).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("method", ["star", "fastv", "pdrop"])
def test_cached_generation_equals_recomputation(model, method):
    inputs = onevision_inputs(model, [[WIDE]], [(5, 4)], seed=1)
    with star.apply(model, method=method, keep=4) as pruner:
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        stats = pruner.stats
    ids, embeds, pos, fixed = prompt_embeds(model, inputs, 0)
    expected = greedy_by_recompute(model, ids, embeds, pos, fixed, kept_of(stats, 0), stats.layers, steps=8)
    assert out[0, -8:].tolist() == expected


@torch.no_grad()
@pytest.mark.parametrize("method", NO_CLS)
def test_batch_of_different_lengths_and_image_layouts_equals_each_alone(model, method):
    sizes = [[WIDE], [SQUARE], [MEDIUM, WIDE]]
    inputs = onevision_inputs(model, sizes, [(3, 6), (7, 4), (1, 9)], seed=2)
    assert_batch_equals_each_alone(model, inputs, method, 6, lambda row: rows_alone(inputs, [row], [len(s) for s in sizes]))


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_sdpa_equals_eager_attention_in_a_batch(positions):
    eager, sdpa = tiny_onevision(attn="eager"), tiny_onevision(attn="sdpa")
    inputs = onevision_inputs(eager, [[SQUARE], [SQUARE]], [(3, 6), (1, 2)], seed=3)
    outputs = []
    for model in (eager, sdpa):
        with star.apply(model, method="star", keep=5, positions=positions) as pruner:
            outputs.append(model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)[:, -5:])
            outputs.append(pruner.stats.kept_patches)
    assert torch.equal(outputs[0], outputs[2])
    assert all(torch.equal(a, b) for a, b in zip(outputs[1], outputs[3]))


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 3, 8, 15, 0.5])
@pytest.mark.parametrize("method", [m for m in NO_CLS if m != "pool"])  # pool: its own grids, tests/test_pool.py
def test_every_unit_keeps_its_share_in_order_and_newlines_stay(model, method, keep):
    # base crop + grid (WIDE unpadded, SQUARE resized); in a prompt of two images, two base crops alone
    for sizes, shown in [([WIDE], [16, 16]), ([SQUARE], [16, 25]), ([MEDIUM, WIDE], [16, 16])]:
        inputs = onevision_inputs(model, [sizes], [(2, 5)], seed=4)
        with star.apply(model, method=method, keep=keep) as pruner:
            logits = model(**inputs).logits
            stats = pruner.stats
        if method == "none":
            expected = sum(shown)
        elif isinstance(keep, float):
            expected = sum(max(1, round(keep * n)) for n in shown)
        else:
            expected = sum(keep if n == CROP else min(n, max(1, round(keep * n / CROP))) for n in shown)
        fixed = prompt_embeds(model, inputs, 0)[3]
        n_image = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
        assert stats.totals[0][0] == sum(shown) == int((~fixed).sum())
        assert stats.totals[0][-1] == expected and len(kept_of(stats, 0)[-1]) == expected
        assert logits.shape[1] == inputs["input_ids"].shape[1] - n_image + int(fixed.sum()) + expected
        for patches in kept_of(stats, 0):
            assert bool((patches[1:] > patches[:-1]).all()) and not bool(fixed[patches].any())
        assert stats.tokens[-1] == (CROP if method == "none" else (round(keep * CROP) if isinstance(keep, float) else keep))


def _grid_by_hand(per_tile: torch.Tensor, rows: int, cols: int, keep_rows: slice, resize: tuple[int, int] | None):
    """Tiles' patch maps [rows * cols, 16] laid out as one picture (tile by tile, 4 x 4 patches each), the kept
    rows of unpadding, then a bilinear resize: the grid's tokens in reading order."""
    picture = per_tile.view(rows, cols, 4, 4).permute(0, 2, 1, 3).reshape(rows * 4, cols * 4)[keep_rows]
    if resize is not None:
        picture = F.interpolate(picture[None, None], size=resize, mode="bilinear")[0, 0]
    return picture.flatten()


@torch.no_grad()
def test_vision_scores_of_base_crops_and_grids_equal_eager_attention():
    eager, sdpa = tiny_onevision(attn="eager"), tiny_onevision(attn="sdpa")
    inputs = onevision_inputs(eager, [[WIDE], [SQUARE]], [(2, 2), (2, 2)], seed=5)
    pixels = torch.cat([inputs["pixel_values"][0, :3], inputs["pixel_values"][1, :5]])
    probs = eager.model.vision_tower(pixels, output_attentions=True).attentions[-1]  # the feature layer is the last
    received = probs.mean(dim=(1, 2))  # [8 crops, 16 patches]
    with star.apply(sdpa, method="star", keep=4) as pruner:
        encoded = pruner.adapter.encode_prompts(inputs, inputs["input_ids"], layout_of(pruner, inputs))
        sdpa(**inputs)
        kept = pruner.stats.kept_patches[0]
    bases, wide_grid, square_grid = (g.view.received() for g in encoded.groups)
    assert torch.allclose(bases, received[[0, 3]], atol=1e-6)
    wide = _grid_by_hand(received[1:3], 1, 2, slice(1, 3), None)  # 4 patch rows, 2 shown: (4 - 2) // 2 cut above
    square = _grid_by_hand(received[4:8], 2, 2, slice(0, 8), (5, 5))
    assert torch.allclose(wide_grid[0], wide, atol=1e-6) and torch.allclose(square_grid[0], square, atol=1e-6)
    # Stage 1 keeps 14 of each base crop (0.85 of 16), 14 of the WIDE grid's 16 and 21 of the SQUARE grid's 25.
    for row, grid, size in [(0, wide, 14), (1, square, 21)]:
        places = encoded.groups[1 + row].ordinals[0]
        expected = torch.cat([top_k_in_order(received[[0, 3][row]], 14), places[top_k_in_order(grid, size)]])
        assert torch.equal(kept[row][kept[row] >= 0], expected)


@torch.no_grad()
def test_decoder_selection_equals_top_k_of_eager_attention():
    eager, sdpa = tiny_onevision(attn="eager"), tiny_onevision(attn="sdpa")
    inputs = onevision_inputs(eager, [[WIDE], [SQUARE]], [(3, 6), (1, 2)], seed=6)
    probs = eager(**inputs, output_attentions=True).attentions[3]
    with star.apply(sdpa, method="star", keep=5, layer=3, stage1_ratio=0.0) as pruner:
        sdpa(**inputs)
        stage, totals = pruner.stats.kept_patches[1], pruner.stats.totals
    for row, ids in enumerate(inputs["input_ids"]):
        fixed = prompt_embeds(eager, inputs, row)[3]
        image = (ids == IMAGE_TOKEN).nonzero()[:, 0]
        text = torch.arange(int(image[-1]) + 1, len(ids))
        scores = probs[row][:, text][:, :, image[~fixed]].mean(dim=(0, 1))
        places = (~fixed).nonzero()[:, 0]
        assert torch.equal(stage[row][stage[row] >= 0], places[top_k_in_order(scores, totals[row][-1])])


@torch.no_grad()
def test_generate_prunes_its_prefill(model):
    inputs = onevision_inputs(model, [[SQUARE]], [(2, 3)], seed=7)
    lengths = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        with star.apply(model, method="star", keep=2) as pruner:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            entry = pruner.stats.sequence_lengths[0]
    finally:
        handle.remove()
    assert lengths[0] == entry < inputs["input_ids"].shape[1]


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="keep"):
        star.apply(model, method="star", keep=CROP + 1)
    for method in ["fastervlm", "visionzip"]:
        with pytest.raises(ValueError, match=rf"method='{method}' cannot prune LlavaOnevision.*\[CLS\]"):
            star.apply(model, method=method, keep=3)
        assert not model._forward_pre_hooks
    inputs = onevision_inputs(model, [[WIDE]], [(2, 2)])
    short = {**inputs, "input_ids": torch.where(inputs["input_ids"] == IMAGE_TOKEN, 5, inputs["input_ids"])}
    with star.apply(model, method="star", keep=4), torch.no_grad():
        with pytest.raises(ValueError, match="image tokens"):
            model(**short)
        with pytest.raises(ValueError, match="image_sizes"):
            model(**{**inputs, "image_sizes": None})
        with pytest.raises(ValueError, match="pixel_values_videos"):
            model(**inputs, pixel_values_videos=torch.zeros(1, 2, 3, 32, 32))


def test_settings_are_checked_on_a_weightless_skeleton(model, tmp_path):
    """What the star command does before any load: star.apply on the config's meta-device skeleton."""
    model.config.save_pretrained(tmp_path)
    skeleton = model_skeleton(str(tmp_path))
    assert next(skeleton.parameters()).device.type == "meta"
    check_setting(skeleton, "star", 8, {"layer": 3}, "contiguous")
    for method in ['fastervlm', 'visionzip']:
        with pytest.raises(ValueError, match=rf"method='{method}' cannot prune LlavaOnevision"):
            check_setting(skeleton, method, 8, {}, "original")
    with pytest.raises(ValueError, match="keep=17"):
        check_setting(skeleton, "star", 17, {}, "original")
