"""Qwen3-VL (and its MoE variant): Qwen2-VL's contract, with DeepStack features added after decoder layers 0-2."""

from __future__ import annotations

import sys

import pytest
import torch

import star
from families import IMAGE_TOKEN, assert_batch_equals_each_alone, kept_of, qwen_inputs, select_rows, tiny_qwen3, layout_of
from star import compat
from star.scoring import top_k_in_order

NO_CLS = [m for m in star.methods() if m not in ("fastervlm", "visionzip")]  # the others need [CLS]
SMALL, LARGE, TINY = (4, 6), (8, 8), (4, 4)  # patch grids: 6, 16 and 4 tokens after the 2 x 2 merge
DEEPSTACK = 3  # the tiny tower feeds decoder layers 0, 1, 2


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3()


def _patches(inputs: dict) -> list[int]:
    return inputs["image_grid_thw"].prod(dim=-1).tolist()


# -- an independent reference: the model's own modules, one prompt, only the kept tokens ------------------


def tower_outputs(model, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's merged tokens [T, D] and DeepStack features [E, T, D], as the unpatched model makes them."""
    out = model.model.visual(pixels, grid_thw=grid)
    tokens, deep = out if isinstance(out, tuple) else (out.pooler_output, out.deepstack_features)
    return tokens, torch.stack(list(deep))


def prompt_parts(model, inputs: dict, row: int, images: list[int]):
    """One prompt without its padding: ids [S], input embeddings [S, D], 3-D positions [3, S], and the DeepStack
    features of its image tokens [E, n_image_tokens, D]."""
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    grid = inputs["image_grid_thw"][images]
    bounds = torch.tensor([0, *_patches(inputs)]).cumsum(0)
    pixels = torch.cat([inputs["pixel_values"][bounds[i] : bounds[i + 1]] for i in images])
    tokens, deep = tower_outputs(model, pixels, grid)
    embeds = model.model.language_model.embed_tokens(ids).clone()
    embeds[ids == IMAGE_TOKEN] = tokens.to(embeds.dtype)
    prompt = {"image_grid_thw": grid, "mm_token_type_ids": (ids[None] == IMAGE_TOKEN).int()}
    positions = compat.qwen_prompt_positions(model, prompt, ids[None], torch.ones(1, len(ids), dtype=torch.long))[:, 0]
    return ids, embeds, positions, deep


def forward_kept(model, ids, embeds, positions, deep, kept, cut_layers, extra_ids=()) -> torch.Tensor:
    """Logits of the last token when only the kept image tokens are present (kept[0] enter the decoder,
    kept[s] are left from cut_layers[s - 1] on); after layer j < E, the DeepStack features of layer j are added
    onto the image tokens present then, as the model adds them onto all of its image tokens."""
    lm = model.model.language_model
    extra = torch.tensor(list(extra_ids), dtype=torch.long)
    embeds = torch.cat([embeds, lm.embed_tokens(extra)])
    after = positions.max() + 1 + torch.arange(len(extra))
    positions = torch.cat([positions, after.expand(3, -1)], dim=1)
    columns = (ids == IMAGE_TOKEN).nonzero()[:, 0]
    place = torch.full((len(embeds),), -1)
    place[columns] = torch.arange(len(columns))

    def present(places: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(len(embeds), dtype=torch.bool)
        keep[columns] = False
        keep[columns[places]] = True
        return keep

    alive = present(kept[0])
    hidden, pos = embeds[alive][None], positions[:, alive]
    for index, layer in enumerate(lm.layers):
        if index in cut_layers:
            stage = present(kept[cut_layers.index(index) + 1])
            inner = stage[alive]
            hidden, pos, alive = hidden[:, inner], pos[:, inner], stage
        n = hidden.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        out = layer(hidden, attention_mask=causal, position_ids=None, position_embeddings=lm.rotary_emb(hidden, pos[:, None]))
        hidden = out[0] if isinstance(out, tuple) else out
        if index < len(deep):
            places = place[alive]
            hidden = hidden.clone()
            hidden[0, places >= 0] += deep[index][places[places >= 0]].to(hidden.dtype)
    return model.lm_head(lm.norm(hidden))[0, -1]


def greedy_by_recompute(model, parts, kept, cut_layers, steps: int) -> list[int]:
    generated: list[int] = []
    for _ in range(steps):
        generated.append(int(forward_kept(model, *parts, kept, cut_layers, generated).argmax()))
    return generated


# -- the contract -----------------------------------------------------------------------------------------


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
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(l._forward_pre_hooks or l._forward_hooks for l in model.model.language_model.layers)


def test_the_reference_sees_deepstack(model):
    """Without the DeepStack additions the reference would be another model: it must differ from the full one."""
    inputs = qwen_inputs([[LARGE]], [(3, 6)], seed=1)
    ids, embeds, positions, deep = prompt_parts(model, inputs, 0, [0])
    with torch.no_grad():
        full = model(**inputs).logits[0, -1]
        every = torch.arange(16)
        assert (forward_kept(model, ids, embeds, positions, deep, [every], []) - full).abs().max() < 1e-5
        assert (forward_kept(model, ids, embeds, positions, deep[:0], [every], []) - full).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize(
    "method, options",
    [("star", {}), ("star", {"layer": 1}), ("fastv", {}), ("pdrop", {}), ("random", {}), ("sparsevlm", {"recycle_ratio": 0.0})],
)
def test_pruned_prefill_equals_forward_over_kept_tokens_with_their_deepstack(model, method, options):
    """Cuts before, at and after the last DeepStack layer (fastv at 2, pdrop at 1, 3, 4, star at 1 and 3)."""
    inputs = qwen_inputs([[SMALL, LARGE]], [(3, 6)], seed=1)
    with star.apply(model, method=method, keep=3, **options) as pruner:
        logits = model(**inputs).logits[0, -1]
        stats = pruner.stats
    parts = prompt_parts(model, inputs, 0, [0, 1])
    expected = forward_kept(model, *parts, kept_of(stats, 0), stats.layers)
    assert (logits - expected).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("method", ["star", "fastv", "pdrop"])
def test_cached_generation_equals_recomputation(model, method):
    inputs = qwen_inputs([[LARGE]], [(5, 4)], seed=2)
    with star.apply(model, method=method, keep=4) as pruner:
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        stats = pruner.stats
    parts = prompt_parts(model, inputs, 0, [0])
    assert out[0, -8:].tolist() == greedy_by_recompute(model, parts, kept_of(stats, 0), stats.layers, steps=8)


@torch.no_grad()
@pytest.mark.parametrize("method, keep", [("star", 3), ("fastv", 2), ("sparsevlm", 0.5), ("random", 0.5)])
def test_batch_of_different_lengths_and_image_sizes_equals_each_alone(model, method, keep):
    grids = [[SMALL], [LARGE, TINY], [TINY]]
    inputs = qwen_inputs(grids, [(3, 6), (7, 4), (1, 9)], seed=4)
    per_row = [len(g) for g in grids]
    assert_batch_equals_each_alone(model, inputs, method, keep, lambda row: select_rows(inputs, [row], per_row, _patches(inputs)))


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 0.25])
@pytest.mark.parametrize("method", [m for m in NO_CLS if m != "pool"])  # pool: its own grids, tests/test_pool.py
def test_every_image_keeps_exactly_its_budget_in_order(model, method, keep):
    inputs = qwen_inputs([[SMALL, LARGE, TINY]], [(2, 5)], seed=5)
    sizes = [6, 16, 4]
    with star.apply(model, method=method, keep=keep) as pruner:
        logits = model(**inputs).logits
        stats = pruner.stats
    budgets = sizes if method == "none" else [max(1, round(keep * n)) if isinstance(keep, float) else keep for n in sizes]
    assert stats.totals[0][0] == sum(sizes) and stats.totals[0][-1] == sum(budgets)
    assert logits.shape[1] == inputs["input_ids"].shape[1] - sum(sizes) + sum(budgets)
    for patches in kept_of(stats, 0):
        assert bool((patches[1:] >= patches[:-1]).all()) and bool((patches < sum(sizes)).all())


@torch.no_grad()
def test_vision_scores_equal_eager_attention_of_the_last_block_summed_per_merged_token(monkeypatch):
    eager, sdpa = tiny_qwen3(attn="eager"), tiny_qwen3(attn="sdpa")
    inputs = qwen_inputs([[SMALL, LARGE]], [(2, 2)], seed=6)
    family = sys.modules[type(eager.model.visual).__module__]
    last = eager.model.visual.blocks[-1].attn
    recorded, original = [], family.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = original(module, *args, **kwargs)
        if module is last:
            recorded.append(weights)
        return out, weights

    monkeypatch.setattr(family, "eager_attention_forward", recording)
    tower_outputs(eager, inputs["pixel_values"], inputs["image_grid_thw"])
    with star.apply(sdpa, method="star", keep=2) as pruner:
        encoded = pruner.adapter.encode_prompts(inputs, inputs["input_ids"], layout_of(pruner, inputs))
    assert len(recorded) == 2 and len(encoded.groups) == 2
    for group, probs in zip(encoded.groups, recorded):
        expected = probs.mean(dim=(1, 2))[0].view(-1, 4).sum(dim=-1)  # Qwen3-VL's tower keeps the natural order
        assert torch.allclose(group.view.received()[0], expected, atol=1e-6)
        assert group.residuals.shape == (1, len(expected), DEEPSTACK, 64)


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 3])
def test_decoder_selection_equals_top_k_of_eager_attention(layer):
    """The eager model's own attention weights (q/k norms, interleaved M-RoPE, DeepStack before the layer)."""
    eager, sdpa = tiny_qwen3(attn="eager"), tiny_qwen3(attn="sdpa")
    inputs = qwen_inputs([[SMALL], [LARGE]], [(3, 6), (1, 2)], seed=7)
    probs = eager(**inputs, output_attentions=True).attentions[layer]
    with star.apply(sdpa, method="star", keep=3, layer=layer, stage1_ratio=0.0) as pruner:
        sdpa(**inputs)
        stage = kept_of(pruner.stats, 0)[1], kept_of(pruner.stats, 1)[1]
    for row, ids in enumerate(inputs["input_ids"]):
        image = (ids == IMAGE_TOKEN).nonzero()[:, 0]
        text = torch.arange(int(image[-1]) + 1, len(ids))
        scores = probs[row][:, text][:, :, image].mean(dim=(0, 1))
        assert torch.equal(stage[row], top_k_in_order(scores, 3))


@torch.no_grad()
def test_moe_variant_keeps_all_exactly_and_prunes_like_the_reference():
    moe = tiny_qwen3(moe=True)
    inputs = qwen_inputs([[SMALL, LARGE]], [(3, 6)], seed=8)
    before = moe(**inputs).logits
    with star.apply(moe, method="none", keep=1.0):
        assert (moe(**inputs).logits - before).abs().max() < 1e-5
    with star.apply(moe, method="fastv", keep=3) as pruner:
        logits = moe(**inputs).logits[0, -1]
        stats = pruner.stats
    expected = forward_kept(moe, *prompt_parts(moe, inputs, 0, [0, 1]), kept_of(stats, 0), stats.layers)
    assert (logits - expected).abs().max() < 1e-4


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="positions='contiguous' is not defined"):
        star.apply(model, method="star", keep=3, positions="contiguous")
    assert not model._forward_pre_hooks
    inputs = qwen_inputs([[SMALL]], [(2, 2)])
    for method in ["fastervlm", "visionzip"]:
        with pytest.raises(ValueError, match=rf"method='{method}' cannot prune Qwen3VL.*\[CLS\]"):
            star.apply(model, method=method, keep=3)
        assert not model._forward_pre_hooks and not model._forward_hooks
    mismatch = {**inputs, "input_ids": torch.where(inputs["input_ids"] == IMAGE_TOKEN, 5, inputs["input_ids"])}
    with star.apply(model, method="star", keep=3), torch.no_grad():
        with pytest.raises(ValueError, match="image tokens"):
            model(**mismatch)
    with star.apply(model, method="star", keep=7), torch.no_grad(), pytest.raises(ValueError, match="keep=7"):
        model(**inputs)


@torch.no_grad()
def test_keep_above_an_images_tokens_is_refused_before_the_tower_runs(model):
    """The images' token counts come back with the layout: a budget one image cannot meet fails before any of
    the tower's compute (its forward is counted)."""
    inputs = qwen_inputs([[LARGE], [TINY]], [(2, 2), (1, 3)])
    calls = []
    handle = model.model.visual.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with star.apply(model, method="star", keep=5), pytest.raises(ValueError, match="keep=5 is above the 4 visual tokens"):
            model(**inputs)
        assert calls == []
        with star.apply(model, method="star", keep=4):
            model(**inputs)
        assert calls == [1]
    finally:
        handle.remove()
