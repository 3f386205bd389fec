"""InternVL: the core's reference tests, with tiles as the units of stage 1 and pixel shuffle merging 2 x 2
patches into each decoder token."""

from __future__ import annotations

import pytest
import torch

import star
import star.adapters.internvl as internvl_adapter
from families import IMAGE_TOKEN, assert_batch_equals_each_alone, forward_kept, greedy_by_recompute, kept_of, layout_of
from star.checks import check_setting, model_skeleton
from star.scoring import top_k_in_order
from tiled_families import TILE, internvl_inputs, prompt_embeds, rows_alone, tiny_internvl

WITH_CLS = [m for m in star.methods() if m != "visionzip"]  # VisionZip keeps [CLS] as a token: refused
SELECTING = ["star", "fastv", "fastervlm", "pdrop", "random"]


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


@torch.no_grad()
@pytest.mark.parametrize("method", WITH_CLS)
def test_full_budget_equals_unpatched_model_and_remove_restores_it(model, method):
    inputs = internvl_inputs([[3], [1, 1]], [(3, 6), (1, 2)])
    before = model(**inputs).logits
    options = {"stage1_ratio": 0.0} if method == "star" else {}
    with star.apply(model, method=method, keep=TILE, **options):
        pruned = model(**inputs).logits
    after = model(**inputs).logits
    assert (pruned - before).abs().max() < 1e-5
    assert torch.equal(after, before)
    assert not model._forward_pre_hooks and not any(l._forward_pre_hooks for l in model.model.language_model.layers)
    assert not any(l._forward_pre_hooks for l in model.model.vision_tower.encoder.layer)


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("method", SELECTING)
def test_pruned_prefill_equals_forward_over_kept_tokens(model, method, positions):
    inputs = internvl_inputs([[2, 1]], [(3, 6)])
    with star.apply(model, method=method, keep=5, positions=positions) as pruner:
        logits = model(**inputs).logits[0, -1]
        stats = pruner.stats
    ids, embeds, pos, fixed = prompt_embeds(model, inputs, 0)
    expected = forward_kept(model, ids, embeds, pos, fixed, kept_of(stats, 0), stats.layers, contiguous=positions == "contiguous")
    assert (logits - expected).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("method", ["star", "fastv", "pdrop", "fastervlm"])
def test_cached_generation_equals_recomputation(model, method):
    inputs = internvl_inputs([[2]], [(5, 4)], seed=1)
    with star.apply(model, method=method, keep=4) as pruner:
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        stats = pruner.stats
    ids, embeds, pos, fixed = prompt_embeds(model, inputs, 0)
    expected = greedy_by_recompute(model, ids, embeds, pos, fixed, kept_of(stats, 0), stats.layers, steps=8)
    assert out[0, -8:].tolist() == expected


@torch.no_grad()
@pytest.mark.parametrize("method", WITH_CLS)
def test_batch_of_different_lengths_and_tile_counts_equals_each_alone(model, method):
    tiles = [[1], [3, 1], [2]]
    inputs = internvl_inputs(tiles, [(3, 6), (7, 4), (1, 9)], seed=2)
    assert_batch_equals_each_alone(model, inputs, method, 6, lambda row: rows_alone(inputs, [row], [sum(t) for t in tiles]))


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_sdpa_equals_eager_attention_in_a_batch(positions):
    eager, sdpa = tiny_internvl(attn="eager"), tiny_internvl(attn="sdpa")
    inputs = internvl_inputs([[2], [1, 1]], [(3, 6), (1, 2)], seed=3)
    outputs = []
    for model in (eager, sdpa):
        with star.apply(model, method="star", keep=5, positions=positions) as pruner:
            outputs.append(model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)[:, -5:])
            outputs.append(pruner.stats.kept_patches)
    assert torch.equal(outputs[0], outputs[2])
    assert all(torch.equal(a, b) for a, b in zip(outputs[1], outputs[3]))


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 3, 8, 0.5])
@pytest.mark.parametrize("method", [m for m in WITH_CLS if m != "pool"])  # pool: its own grids, tests/test_pool.py
def test_every_tile_keeps_exactly_its_budget_in_order(model, method, keep):
    inputs = internvl_inputs([[3, 1]], [(2, 5)], seed=4)
    with star.apply(model, method=method, keep=keep) as pruner:
        logits = model(**inputs).logits
        stats = pruner.stats
    per_tile = TILE if method == "none" else (round(keep * TILE) if isinstance(keep, float) else keep)
    assert stats.totals[0][0] == 4 * TILE and stats.totals[0][-1] == 4 * per_tile
    assert stats.tokens[0] == TILE and stats.tokens[-1] == per_tile
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 4 * TILE + 4 * per_tile
    for patches in kept_of(stats, 0):
        assert bool((patches[1:] > patches[:-1]).all()) and bool((patches < 4 * TILE).all())
    entry = kept_of(stats, 0)[0] // TILE  # stage 1 keeps the same share of every tile
    assert [int((entry == t).sum()) for t in range(4)] == [stats.tokens[1]] * 4


def _blocks_by_hand(per_patch: torch.Tensor) -> torch.Tensor:
    """Patch scores [I, 64] of an 8 x 8 grid summed over 2 x 2 blocks: token (r, c) of the 4 x 4 result merges
    patches (2r, 2c), (2r, 2c + 1), (2r + 1, 2c), (2r + 1, 2c + 1). [I, 16], tokens in reading order."""
    grid = per_patch.view(-1, 4, 2, 4, 2)  # [I, r, row in block, c, column in block]
    return grid.sum(dim=(2, 4)).flatten(1)


@torch.no_grad()
@pytest.mark.parametrize("method", ["star", "fastervlm"])
def test_vision_scores_equal_eager_attention_summed_per_merged_token(method, monkeypatch):
    monkeypatch.setattr(internvl_adapter, "TILES_AT_ONCE", 2)  # three tiles: scored in two pieces
    eager, sdpa = tiny_internvl(attn="eager"), tiny_internvl(attn="sdpa")
    inputs = internvl_inputs([[2], [1]], [(2, 2), (3, 1)], seed=5)
    weights = []  # the eager attention weights of the tower's last layer (4.57's tower takes no output_attentions)
    layer = eager.model.vision_tower.encoder.layer[-1].attention
    handle = layer.register_forward_hook(lambda module, args, output: weights.append(output[1]))
    try:
        eager.model.vision_tower(pixel_values=inputs["pixel_values"])
    finally:
        handle.remove()
    probs = weights[0]
    received = _blocks_by_hand(probs.mean(dim=(1, 2))[:, 1:])  # mean over heads and every row, [CLS] dropped
    cls_row = _blocks_by_hand(probs[:, :, 0, 1:].mean(dim=1))
    with star.apply(sdpa, method=method, keep=4) as pruner:
        view = pruner.adapter.encode_prompts(inputs, inputs["input_ids"], layout_of(pruner, inputs)).groups[0].view
        sdpa(**inputs)
        kept = pruner.stats.kept_patches[0]
    assert torch.allclose(view.received(), received, atol=1e-6)
    assert torch.allclose(view.cls_attention(), cls_row, atol=1e-6)
    scores, k = (received, 14) if method == "star" else (cls_row, 4)  # STAR's stage 1 keeps 0.85 of 16
    chosen = top_k_in_order(scores, k) + TILE * torch.tensor([0, 1, 0])[:, None]  # places within each prompt
    assert torch.equal(kept[0], chosen[:2].flatten()) and torch.equal(kept[1][kept[1] >= 0], chosen[2])


@torch.no_grad()
def test_decoder_selection_equals_top_k_of_eager_attention():
    eager, sdpa = tiny_internvl(attn="eager"), tiny_internvl(attn="sdpa")
    inputs = internvl_inputs([[2], [1]], [(3, 6), (1, 2)], seed=6)
    probs = eager(**inputs, output_attentions=True).attentions[3]
    with star.apply(sdpa, method="star", keep=5, layer=3, stage1_ratio=0.0) as pruner:
        sdpa(**inputs)
        stage = pruner.stats.kept_patches[1]
    for row, (ids, tiles) in enumerate(zip(inputs["input_ids"], [2, 1])):
        image = (ids == IMAGE_TOKEN).nonzero()[:, 0]
        text = torch.arange(int(image[-1]) + 1, len(ids))  # </img> and after
        scores = probs[row][:, text][:, :, image].mean(dim=(0, 1))
        assert torch.equal(stage[row][stage[row] >= 0], top_k_in_order(scores, 5 * tiles))


@torch.no_grad()
def test_generate_prunes_its_prefill(model):
    inputs = internvl_inputs([[2]], [(2, 3)], seed=7)
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
        star.apply(model, method="star", keep=TILE + 1)
    with pytest.raises(ValueError, match=r"method='visionzip' cannot prune InternVL.*\[CLS\]"):
        star.apply(model, method="visionzip", keep=3)
    assert not model._forward_pre_hooks
    inputs = internvl_inputs([[2]], [(2, 2)])
    short = {**inputs, "input_ids": torch.where(inputs["input_ids"] == IMAGE_TOKEN, 5, inputs["input_ids"])}
    with star.apply(model, method="star", keep=4), torch.no_grad():
        with pytest.raises(ValueError, match="image tokens"):
            model(**short)
        with pytest.raises(ValueError, match="image tokens"):
            model(**{**inputs, "pixel_values": inputs["pixel_values"][:1]})


def test_settings_are_checked_on_a_weightless_skeleton(model, tmp_path):
    """What the star command does before any load: star.apply on the config's meta-device skeleton."""
    model.config.save_pretrained(tmp_path)
    skeleton = model_skeleton(str(tmp_path))
    assert next(skeleton.parameters()).device.type == "meta"
    check_setting(skeleton, "star", 8, {"layer": 3}, "contiguous")
    for method in ['visionzip']:
        with pytest.raises(ValueError, match=rf"method='{method}' cannot prune InternVL"):
            check_setting(skeleton, method, 8, {}, "original")
    with pytest.raises(ValueError, match="keep=17"):
        check_setting(skeleton, "star", 17, {}, "original")
