"""LLaVA-NeXT: the core's reference tests, with crops as the units of stage 1 and newline tokens kept."""

from __future__ import annotations

import pytest
import torch

import star
from families import (
    layout_of,
    CROP,
    IMAGE_TOKEN,
    assert_batch_equals_each_alone,
    forward_kept,
    full_embeds,
    greedy_by_recompute,
    kept_of,
    next_inputs,
    select_rows,
    tiny_llava_next,
)
from star.scoring import top_k_in_order

SELECTING = ["star", "fastv", "fastervlm", "pdrop", "random", "vispruner", "divprune", "cdpruner", "dart"]
# (20, 70) picks the 32 x 64 grid and unpads it to 2 of its 4 patch rows: its tiles are shown in part.
WIDE, SQUARE, MEDIUM = (20, 70), (64, 64), (40, 70)


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


def _one(model, size=WIDE, text=(3, 6), seed=0) -> dict:
    return next_inputs(model, [[size]], [text], seed=seed)


@torch.no_grad()
@pytest.mark.parametrize("method", star.methods())
def test_full_budget_equals_unpatched_model_and_remove_restores_it(model, method):
    inputs = next_inputs(model, [[WIDE], [SQUARE]], [(3, 6), (1, 2)])
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
    inputs = _one(model)
    with star.apply(model, method=method, keep=5, positions=positions) as pruner:
        logits = model(**inputs).logits[0, -1]
        stats = pruner.stats
    ids, embeds, pos, fixed = full_embeds(model, inputs, 0, [0])
    expected = forward_kept(model, ids, embeds, pos, fixed, kept_of(stats, 0), stats.layers, contiguous=positions == "contiguous")
    assert (logits - expected).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("method", ["star", "fastv", "pdrop", "fastervlm", "divprune", "dart"])
def test_cached_generation_equals_recomputation(model, method):
    inputs = _one(model, SQUARE, text=(5, 4), seed=1)
    with star.apply(model, method=method, keep=4) as pruner:
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        stats = pruner.stats
    ids, embeds, pos, fixed = full_embeds(model, inputs, 0, [0])
    expected = greedy_by_recompute(model, ids, embeds, pos, fixed, kept_of(stats, 0), stats.layers, steps=8)
    assert out[0, -8:].tolist() == expected


@torch.no_grad()
@pytest.mark.parametrize("method", star.methods())
def test_batch_of_different_lengths_and_image_layouts_equals_each_alone(model, method):
    sizes = [[WIDE], [SQUARE], [MEDIUM, WIDE]]
    inputs = next_inputs(model, sizes, [(3, 6), (7, 4), (1, 9)], seed=2)
    per_row = [len(s) for s in sizes]
    assert_batch_equals_each_alone(model, inputs, method, 6, lambda row: select_rows(inputs, [row], per_row))


@torch.no_grad()
@pytest.mark.parametrize("method", ["fastervlm", "random", "star", "pdrop"])
def test_contiguous_positions_in_a_batch_of_uneven_rows_equal_each_alone(model, method):
    """Rows keep different numbers of tokens, and a decoder cut pads the shorter one: its positions and each
    decode step's still count only its own tokens."""
    sizes = [[WIDE], [SQUARE]]
    inputs = next_inputs(model, sizes, [(3, 6), (1, 2)], seed=6)
    options = dict(max_new_tokens=5, do_sample=False, min_new_tokens=5, output_logits=True, return_dict_in_generate=True)
    with star.apply(model, method=method, keep=3, positions="contiguous"):
        together = model.generate(**inputs, **options)
        for row in range(2):
            alone = model.generate(**select_rows(inputs, [row], [1, 1]), **options)
            assert together.sequences[row, -5:].tolist() == alone.sequences[0, -5:].tolist()
            for step_together, step_alone in zip(together.logits, alone.logits):
                assert (step_together[row] - step_alone[0]).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_batch_of_same_layouts_and_eager_attention(positions):
    model = tiny_llava_next(attn="eager")
    inputs = next_inputs(model, [[WIDE], [WIDE]], [(3, 6), (1, 2)], seed=3)
    with star.apply(model, method="star", keep=5, positions=positions) as pruner:
        together = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)[:, -5:]
        stats = pruner.stats
    for row in range(2):
        ids, embeds, pos, fixed = full_embeds(model, inputs, row, [row])
        kept = kept_of(stats, row)
        expected = [
            int(forward_kept(model, ids, embeds, pos, fixed, kept, stats.layers, together[row, :t].tolist(), positions == "contiguous").argmax())
            for t in range(5)
        ]
        assert together[row].tolist() == expected


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 3, 8, 15, 0.5])
@pytest.mark.parametrize("method", [m for m in star.methods() if m != "pool"])  # pool: its own grids, tests/test_pool.py
def test_every_crop_keeps_its_share_in_order_and_newlines_stay(model, method, keep):
    inputs = next_inputs(model, [[WIDE, SQUARE]], [(2, 5)], seed=4)
    n_image = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    with star.apply(model, method=method, keep=keep) as pruner:
        logits = model(**inputs).logits
        stats = pruner.stats
    fixed = full_embeds(model, inputs, 0, [0, 1])[3]
    shown = [16, 8, 8, 16, 16, 16, 16, 16]  # WIDE: the base crop, two tiles showing 8 each; SQUARE: 5 crops
    if method == "none":
        expected = sum(shown)
    elif isinstance(keep, float):
        expected = sum(max(1, round(keep * n)) for n in shown)
    else:
        expected = sum(keep if n == CROP else min(n, max(1, round(keep * n / CROP))) for n in shown)
    assert stats.totals[0][0] == sum(shown) == int((~fixed).sum())
    assert stats.totals[0][-1] == expected and len(kept_of(stats, 0)[-1]) == expected
    assert stats.tokens[-1] == (CROP if method == "none" else (round(keep * CROP) if isinstance(keep, float) else keep))
    assert logits.shape[1] == inputs["input_ids"].shape[1] - n_image + int(fixed.sum()) + expected
    for patches in kept_of(stats, 0):
        assert bool((patches[1:] >= patches[:-1]).all()) and not bool(fixed[patches].any())


@torch.no_grad()
def test_vision_scores_of_whole_and_partial_crops_equal_eager_attention():
    eager, sdpa = tiny_llava_next(attn="eager"), tiny_llava_next(attn="sdpa")
    inputs = _one(eager)
    pixels = inputs["pixel_values"][0, :3]  # WIDE: base crop and two tiles
    probs = eager.model.vision_tower(pixels, output_attentions=True).attentions[1]  # output is layer -2
    with star.apply(sdpa, method="star", keep=4) as pruner:
        encoded = pruner.adapter.encode_prompts(inputs, inputs["input_ids"], layout_of(pruner, inputs))
    assert [g.view.features.shape[:2] for g in encoded.groups] == [(1, 16), (1, 8), (1, 8)]
    for crop, group in enumerate(encoded.groups):
        shown = torch.arange(16) if crop == 0 else group.view.columns[1:] - 1
        received = probs[crop].mean(dim=(0, 1))[1:][shown]
        cls_row = probs[crop, :, 0, 1:].mean(dim=0)[shown]
        assert torch.allclose(group.view.received()[0], received, atol=1e-6)
        assert torch.allclose(group.view.cls_attention()[0], cls_row, atol=1e-6)


@torch.no_grad()
def test_decoder_selection_equals_top_k_of_eager_attention():
    eager, sdpa = tiny_llava_next(attn="eager"), tiny_llava_next(attn="sdpa")
    inputs = next_inputs(eager, [[WIDE], [WIDE]], [(3, 6), (1, 2)], seed=5)
    probs = eager(**inputs, output_attentions=True).attentions[3]
    with star.apply(sdpa, method="star", keep=5, layer=3, stage1_ratio=0.0) as pruner:
        sdpa(**inputs)
        stage, totals = pruner.stats.kept_patches[1], pruner.stats.totals
    fixed = full_embeds(eager, inputs, 0, [0])[3]
    for row, ids in enumerate(inputs["input_ids"]):
        image = (ids == IMAGE_TOKEN).nonzero()[:, 0]
        text = torch.arange(int(image[-1]) + 1, len(ids))
        scores = probs[row][:, text][:, :, image[~fixed]].mean(dim=(0, 1))
        places = (~fixed).nonzero()[:, 0]
        assert torch.equal(stage[row], places[top_k_in_order(scores, totals[row][-1])])


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="keep"):
        star.apply(model, method="star", keep=CROP + 1)
    inputs = _one(model)
    inputs["input_ids"] = inputs["input_ids"][:, 1:]
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    short = {**inputs, "input_ids": torch.where(inputs["input_ids"] == IMAGE_TOKEN, 5, inputs["input_ids"])}
    with star.apply(model, method="star", keep=4), torch.no_grad():
        with pytest.raises(ValueError, match="image tokens"):
            model(**short)
        with pytest.raises(ValueError, match="image_sizes"):
            model(**{**inputs, "image_sizes": None})
