"""Qwen2-VL and Qwen2.5-VL: the core's reference tests, with no [CLS], merged patches and 3-D positions."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import DynamicCache

import star
from families import (
    layout_of,
    IMAGE_TOKEN,
    assert_batch_equals_each_alone,
    forward_kept,
    full_embeds,
    greedy_by_recompute,
    image_features,
    kept_of,
    qwen_inputs,
    select_rows,
    tiny_qwen,
)
from star import compat
from star.scoring import top_k_in_order

VERSIONS = ["2", "2.5"]
NO_CLS = [m for m in star.methods() if m not in ("fastervlm", "visionzip")]  # the others need [CLS]
SELECTING = ["star", "fastv", "pdrop", "random", "vispruner", "divprune", "cdpruner", "dart"]  # kept tokens are plain tokens: a forward over them is a reference
SMALL, LARGE, TINY = (4, 6), (8, 8), (4, 4)  # patch grids: 6, 16 and 4 tokens after the 2 x 2 merge


@pytest.fixture(scope="module", params=VERSIONS)
def model(request):
    return tiny_qwen(request.param)


def _patches(inputs: dict) -> list[int]:
    return inputs["image_grid_thw"].prod(dim=-1).tolist()


@torch.no_grad()
@pytest.mark.parametrize("method", star.methods())
def test_full_budget_equals_unpatched_model_and_remove_restores_it(model, method):
    inputs = qwen_inputs([[SMALL, LARGE], [TINY]], [(3, 6), (1, 2)])
    before = model(**inputs).logits
    options = {"stage1_ratio": 0.0} if method == "star" else {}
    with star.apply(model, method=method, keep=1.0, **options):
        pruned = model(**inputs).logits
    after = model(**inputs).logits
    assert (pruned - before).abs().max() < 1e-5
    assert torch.equal(after, before)
    assert not model._forward_pre_hooks and not any(l._forward_pre_hooks for l in model.model.language_model.layers)
    assert not any(b._forward_pre_hooks for b in model.model.visual.blocks)


@torch.no_grad()
@pytest.mark.parametrize("method", SELECTING)
def test_pruned_prefill_equals_forward_over_kept_tokens_at_their_3d_positions(model, method):
    inputs = qwen_inputs([[SMALL, LARGE]], [(3, 6)], seed=1)
    with star.apply(model, method=method, keep=3) as pruner:
        logits = model(**inputs).logits[0, -1]
        stats = pruner.stats
    ids, embeds, positions, fixed = full_embeds(model, inputs, 0, [0, 1])
    assert positions.shape == (3, len(ids)) and not torch.equal(positions[1], positions[2])
    expected = forward_kept(model, ids, embeds, positions, fixed, kept_of(stats, 0), stats.layers)
    assert (logits - expected).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("method", ["star", "fastv", "pdrop", "cdpruner", "dart"])
def test_cached_generation_equals_recomputation(model, method):
    inputs = qwen_inputs([[LARGE]], [(5, 4)], seed=2)
    with star.apply(model, method=method, keep=4) as pruner:
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        stats = pruner.stats
    ids, embeds, positions, fixed = full_embeds(model, inputs, 0, [0])
    expected = greedy_by_recompute(model, ids, embeds, positions, fixed, kept_of(stats, 0), stats.layers, steps=8)
    assert out[0, -8:].tolist() == expected


@torch.no_grad()
def test_decode_steps_without_generate_continue_the_3d_positions(model):
    """Called by hand, the model gets no positions at decode: the pruner continues them after the prompt's."""
    inputs = qwen_inputs([[SMALL]], [(2, 3)], seed=3)
    with star.apply(model, method="star", keep=2) as pruner:
        cache = DynamicCache()
        logits = model(**inputs, **compat.cache_kwargs(cache)).logits[0, -1]
        tokens, mask = [int(logits.argmax())], inputs["attention_mask"]
        for _ in range(3):
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            step = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask, **compat.cache_kwargs(cache))
            tokens.append(int(step.logits[0, -1].argmax()))
        stats = pruner.stats
    ids, embeds, positions, fixed = full_embeds(model, inputs, 0, [0])
    assert tokens == greedy_by_recompute(model, ids, embeds, positions, fixed, kept_of(stats, 0), stats.layers, steps=4)


@torch.no_grad()
@pytest.mark.parametrize("method, keep", [(m, 0.5) for m in NO_CLS] + [("star", 3)])
def test_batch_of_different_lengths_and_image_sizes_equals_each_alone(model, method, keep):
    grids = [[SMALL], [LARGE, TINY], [TINY]]
    inputs = qwen_inputs(grids, [(3, 6), (7, 4), (1, 9)], seed=4)
    per_row = [len(g) for g in grids]
    assert_batch_equals_each_alone(model, inputs, method, keep, lambda row: select_rows(inputs, [row], per_row, _patches(inputs)))


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 2, 4, 0.25])
@pytest.mark.parametrize("method", [m for m in NO_CLS if m != "pool"])  # pool: its own grids, tests/test_pool.py
def test_every_image_keeps_exactly_its_budget_in_order(model, method, keep):
    inputs = qwen_inputs([[SMALL, LARGE, TINY]], [(2, 5)], seed=5)
    sizes = [6, 16, 4]
    with star.apply(model, method=method, keep=keep) as pruner:
        logits = model(**inputs).logits
        stats = pruner.stats
    budgets = sizes if method == "none" else [max(1, round(keep * n)) if isinstance(keep, float) else keep for n in sizes]
    assert stats.totals[0][0] == sum(sizes) and stats.totals[0][-1] == sum(budgets)
    assert stats.tokens[0] == sizes[0] and stats.tokens[-1] == budgets[0]
    assert logits.shape[1] == inputs["input_ids"].shape[1] - sum(sizes) + sum(budgets)
    for patches in kept_of(stats, 0):
        assert bool((patches[1:] >= patches[:-1]).all()) and bool((patches < sum(sizes)).all())


def _window_order(grids: list[tuple[int, int]], merged_per_window: int) -> torch.Tensor:
    """Qwen2.5-VL's window order written out: each image's merged-token grid is cut into square windows of
    `merged_per_window` tokens a side (window_size / patch_size / merge_size), windows row by row, tokens
    row by row within a window; entry i is the merged token the tower's i-th group of patches becomes."""
    order, start = [], 0
    for h, w in grids:
        rows, cols = h // 2, w // 2
        for top in range(0, rows, merged_per_window):
            for left in range(0, cols, merged_per_window):
                for r in range(top, min(top + merged_per_window, rows)):
                    order += [start + r * cols + c for c in range(left, min(left + merged_per_window, cols))]
        start += rows * cols
    return torch.tensor(order)


def _eager_vision_weights(model, inputs: dict, monkeypatch) -> list[torch.Tensor]:
    """The eager attention weights of the tower's last full-attention layer, one [1, H, T, T] per image."""
    family = sys.modules[type(model.model.visual).__module__]
    visual = model.model.visual
    full = getattr(visual, "fullatt_block_indexes", None)
    layer = visual.blocks[max(full) if full else -1].attn
    recorded, original = [], family.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = original(module, *args, **kwargs)
        if module is layer:
            recorded.append(weights)
        return out, weights

    monkeypatch.setattr(family, "eager_attention_forward", recording)
    image_features(model, inputs["pixel_values"], inputs["image_grid_thw"])
    return recorded


@torch.no_grad()
@pytest.mark.parametrize("version", VERSIONS)
def test_vision_scores_equal_eager_attention_summed_per_merged_token(version, monkeypatch):
    eager, sdpa = tiny_qwen(version, attn="eager"), tiny_qwen(version, attn="sdpa")
    inputs = qwen_inputs([[SMALL, LARGE]], [(2, 2)], seed=6)
    weights = _eager_vision_weights(eager, inputs, monkeypatch)
    window = _window_order([SMALL, LARGE], merged_per_window=2) if version == "2.5" else torch.arange(22)
    with star.apply(sdpa, method="star", keep=2) as pruner:
        encoded = pruner.adapter.encode_prompts(inputs, inputs["input_ids"], layout_of(pruner, inputs))
    start = 0
    for image, (group, probs) in enumerate(zip(encoded.groups, weights)):
        per_patch = probs.mean(dim=(1, 2))[0]  # in the layer's (window) order
        per_token_in_layer_order = per_patch.view(-1, 4).sum(dim=-1)
        n = len(per_token_in_layer_order)
        expected = torch.empty(n)
        expected[window[start : start + n] - start] = per_token_in_layer_order
        assert torch.allclose(group.view.received()[0], expected, atol=1e-6)
        start += n
    assert start == 22 and len(weights) == 2


@torch.no_grad()
@pytest.mark.parametrize("version", VERSIONS)
def test_decoder_selection_equals_top_k_of_eager_attention(version):
    eager, sdpa = tiny_qwen(version, attn="eager"), tiny_qwen(version, attn="sdpa")
    inputs = qwen_inputs([[SMALL], [LARGE]], [(3, 6), (1, 2)], seed=7)
    probs = eager(**inputs, output_attentions=True).attentions[3]
    with star.apply(sdpa, method="star", keep=3, layer=3, stage1_ratio=0.0) as pruner:
        sdpa(**inputs)
        stage = kept_of(pruner.stats, 0)[1], kept_of(pruner.stats, 1)[1]
    for row, ids in enumerate(inputs["input_ids"]):
        image = (ids == IMAGE_TOKEN).nonzero()[:, 0]
        text = torch.arange(int(image[-1]) + 1, len(ids))
        scores = probs[row][:, text][:, :, image].mean(dim=(0, 1))
        assert torch.equal(stage[row], top_k_in_order(scores, 3))


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="positions='contiguous' is not defined"):
        star.apply(model, method="star", keep=3, positions="contiguous")
    assert not model._forward_pre_hooks
    inputs = qwen_inputs([[SMALL]], [(2, 2)])
    for method in ["fastervlm", "visionzip"]:
        with pytest.raises(ValueError, match=rf"method='{method}' cannot prune Qwen2.*\[CLS\]"):
            star.apply(model, method=method, keep=3)
        assert not model._forward_pre_hooks
    mismatch = {**inputs, "input_ids": torch.where(inputs["input_ids"] == IMAGE_TOKEN, 5, inputs["input_ids"])}
    with star.apply(model, method="star", keep=3), torch.no_grad():
        with pytest.raises(ValueError, match="image tokens"):
            model(**mismatch)
    with star.apply(model, method="star", keep=7), torch.no_grad(), pytest.raises(ValueError, match="keep=7"):
        model(**inputs)


@torch.no_grad()
@pytest.mark.parametrize("method", ["fastv", "pdrop", "star", "star-vision"])
def test_rows_of_one_length_that_keep_different_counts_equal_each_alone(model, method):
    """No padding in the prompts, so the model makes no mask (and generate() passes none at decode); stage 1 or a
    cut keeps more tokens of the row with two images and pads the other: that padding is still hidden, at prefill
    and at every decode step."""
    grids = [[(4, 8)], [(4, 4), (4, 4)]]
    inputs = qwen_inputs(grids, [(3, 6), (2, 5)], seed=3)
    assert bool(inputs["attention_mask"].all())
    assert_batch_equals_each_alone(model, inputs, method, 2, lambda row: select_rows(inputs, [row], [1, 2], _patches(inputs)))
