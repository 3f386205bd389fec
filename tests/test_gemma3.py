"""Gemma 3: pooled SigLIP tokens, bidirectional image blocks, sliding and global layers with their own masks
and rotary embeddings; the same contract as the other families."""

from __future__ import annotations

import pytest
import torch

import star
from families import GEMMA_TOKENS, IMAGE_TOKEN, assert_batch_equals_each_alone, gemma_inputs, kept_of, tiny_gemma3, layout_of
from conftest import left_pad
from star import compat
from star.scoring import top_k_in_order

NO_CLS = [m for m in star.methods() if m not in ("fastervlm", "visionzip")]  # the others need [CLS]


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3()


# -- an independent reference: the model's own modules, one prompt, only the kept tokens ------------------


def prompt_parts(model, inputs: dict, row: int, images: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prompt without its padding: ids [S], input embeddings [S, D] as the unpatched model builds them, and
    the image block each token is in [S] (-1 for text)."""
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    lm = model.model.language_model
    embeds = lm.embed_tokens(ids.masked_fill(ids == IMAGE_TOKEN, 0)).clone()
    features = model.model.get_image_features(inputs["pixel_values"][images])
    features = getattr(features, "pooler_output", features)
    is_image = ids == IMAGE_TOKEN
    embeds[is_image] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    starts = is_image & ~torch.cat([torch.tensor([False]), is_image[:-1]])
    block = torch.where(is_image, starts.long().cumsum(0) - 1, -1)
    return ids, embeds, block


def _rotary(lm, hidden, positions, layer_type):
    if compat.V5:
        return lm.rotary_emb(hidden, positions, layer_type)
    return (lm.rotary_emb_local if layer_type == "sliding_attention" else lm.rotary_emb)(hidden, positions)


def forward_kept(model, ids, embeds, block, kept, cut_layers, extra_ids=(), contiguous=False) -> torch.Tensor:
    """Logits of the last token when only the kept image tokens are present (kept[0] enter the decoder, kept[s]
    are left from cut_layers[s - 1] on). Each layer's mask: causal, within the sliding window for sliding
    layers, and both ways between present tokens of one image block; each layer type its own rotary table."""
    lm = model.model.language_model
    text = model.config.get_text_config()
    extra = torch.tensor(list(extra_ids), dtype=torch.long)
    embeds = torch.cat([embeds, lm.embed_tokens(extra)])
    block = torch.cat([block, torch.full((len(extra),), -1)])
    positions = torch.arange(len(embeds))
    columns = (torch.cat([ids, extra]) == IMAGE_TOKEN).nonzero()[:, 0]

    def present(places: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(len(embeds), dtype=torch.bool)
        keep[columns] = False
        keep[columns[places]] = True
        return keep

    alive = present(kept[0])
    hidden = embeds[alive][None]
    for index, layer in enumerate(lm.layers):
        if index in cut_layers:
            stage = present(kept[cut_layers.index(index) + 1])
            hidden, alive = hidden[:, stage[alive]], stage
        n = hidden.shape[1]
        pos = (torch.arange(n) if contiguous else positions[alive])[None]
        q, k, b = torch.arange(n)[:, None], torch.arange(n)[None], block[alive]
        causal = k <= q
        if text.layer_types[index] == "sliding_attention":
            causal = causal & (q - k < text.sliding_window)
        allowed = causal | ((b[:, None] == b[None]) & (b[:, None] >= 0))
        mask = torch.zeros(n, n).masked_fill(~allowed, float("-inf"))[None, None]
        if compat.V5:
            out = layer(hidden, position_embeddings=_rotary(lm, hidden, pos, text.layer_types[index]), attention_mask=mask, position_ids=pos)
        else:
            out = layer(
                hidden, position_embeddings_global=_rotary(lm, hidden, pos, "full_attention"),
                position_embeddings_local=_rotary(lm, hidden, pos, "sliding_attention"), attention_mask=mask, position_ids=pos,
            )
        hidden = out[0] if isinstance(out, tuple) else out
    logits = model.lm_head(lm.norm(hidden))[0, -1]
    cap = text.final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap


def greedy_by_recompute(model, parts, kept, cut_layers, steps: int, contiguous=False) -> list[int]:
    generated: list[int] = []
    for _ in range(steps):
        generated.append(int(forward_kept(model, *parts, kept, cut_layers, generated, contiguous).argmax()))
    return generated


def select_rows(inputs: dict, rows: list[int], images_per_row: list[int]) -> dict:
    """The inputs of some prompts alone, their padding removed (their images follow them)."""
    starts = [sum(images_per_row[:r]) for r in range(len(images_per_row))]
    images = [i for r in rows for i in range(starts[r], starts[r] + images_per_row[r])]
    out = left_pad([inputs["input_ids"][r][inputs["attention_mask"][r].bool()].tolist() for r in rows])
    return {**out, "pixel_values": inputs["pixel_values"][images], "token_type_ids": (out["input_ids"] == IMAGE_TOKEN).long()}


# -- the contract -----------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("method", star.methods())
def test_full_budget_equals_unpatched_model_and_remove_restores_it(model, method):
    inputs = gemma_inputs([2, 1], [(3, 6), (1, 2)])
    before = model(**inputs).logits
    options = {"stage1_ratio": 0.0} if method == "star" else {}
    with star.apply(model, method=method, keep=1.0, **options):
        pruned = model(**inputs).logits
    after = model(**inputs).logits
    assert (pruned - before).abs().max() < 1e-5
    assert torch.equal(after, before)
    assert not model._forward_pre_hooks and not any(l._forward_pre_hooks for l in model.model.language_model.layers)


def test_the_reference_sees_the_image_blocks(model):
    """The reference is the model: equal to it with every token, and the bidirectional blocks matter."""
    inputs = gemma_inputs([2], [(3, 6)], seed=1)
    ids, embeds, block = prompt_parts(model, inputs, 0, [0, 1])
    every = torch.arange(2 * GEMMA_TOKENS)
    with torch.no_grad():
        full = model(**inputs).logits[0, -1]
        assert (forward_kept(model, ids, embeds, block, [every], []) - full).abs().max() < 1e-5
        causal_only = torch.full_like(block, -1)
        assert (forward_kept(model, ids, embeds, causal_only, [every], []) - full).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize(
    "method, options, positions",
    [
        ("star", {}, "original"), ("star", {"layer": 2}, "contiguous"), ("fastv", {}, "original"),
        ("pdrop", {}, "original"), ("pdrop", {}, "contiguous"), ("random", {}, "contiguous"),
        ("sparsevlm", {"recycle_ratio": 0.0}, "original"),
    ],
)
def test_pruned_prefill_equals_forward_over_kept_tokens(model, method, options, positions):
    """Cuts at sliding layers (2, 4) and global ones (1, 3): every later layer of either type gets its own
    mask and rotary table cut to the kept tokens."""
    inputs = gemma_inputs([2], [(3, 6)], seed=1)
    with star.apply(model, method=method, keep=5, positions=positions, **options) as pruner:
        logits = model(**inputs).logits[0, -1]
        stats = pruner.stats
    parts = prompt_parts(model, inputs, 0, [0, 1])
    expected = forward_kept(model, *parts, kept_of(stats, 0), stats.layers, contiguous=positions == "contiguous")
    assert (logits - expected).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("method, positions", [("star", "original"), ("fastv", "original"), ("pdrop", "contiguous")])
def test_cached_generation_equals_recomputation(model, method, positions):
    inputs = gemma_inputs([1], [(5, 4)], seed=2)
    with star.apply(model, method=method, keep=4, positions=positions) as pruner:
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        stats = pruner.stats
    parts = prompt_parts(model, inputs, 0, [0])
    expected = greedy_by_recompute(model, parts, kept_of(stats, 0), stats.layers, 8, positions == "contiguous")
    assert out[0, -8:].tolist() == expected


@torch.no_grad()
@pytest.mark.parametrize("method, keep", [("star", 3), ("pdrop", 2), ("sparsevlm", 0.5), ("random", 0.5)])
def test_batch_of_different_lengths_and_image_counts_equals_each_alone(model, method, keep):
    images = [1, 2, 1]
    inputs = gemma_inputs(images, [(3, 6), (7, 4), (1, 9)], seed=4)
    assert_batch_equals_each_alone(model, inputs, method, keep, lambda row: select_rows(inputs, [row], images))


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 0.25])
@pytest.mark.parametrize("method", NO_CLS)
def test_every_image_keeps_exactly_its_budget_in_order(model, method, keep):
    inputs = gemma_inputs([3], [(2, 5)], seed=5)
    with star.apply(model, method=method, keep=keep) as pruner:
        logits = model(**inputs).logits
        stats = pruner.stats
    budget = GEMMA_TOKENS if method == "none" else (max(1, round(keep * GEMMA_TOKENS)) if isinstance(keep, float) else keep)
    assert stats.tokens[0] == GEMMA_TOKENS and stats.tokens[-1] == budget
    assert stats.totals[0][0] == 3 * GEMMA_TOKENS and stats.totals[0][-1] == 3 * budget
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 3 * (GEMMA_TOKENS - budget)
    for patches in kept_of(stats, 0):
        assert bool((patches[1:] > patches[:-1]).all()) and bool((patches < 3 * GEMMA_TOKENS).all())


@torch.no_grad()
def test_vision_scores_equal_eager_attention_summed_over_each_pooled_block():
    eager, sdpa = tiny_gemma3(attn="eager"), tiny_gemma3(attn="sdpa")
    inputs = gemma_inputs([2], [(2, 2)], seed=6)
    weights = eager.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions[-1]
    per_patch = weights.mean(dim=(1, 2)).view(2, 4, 4, 4, 4)  # [image, token row, row in block, token col, col in block]
    expected = per_patch.sum(dim=(2, 4)).flatten(1)
    with star.apply(sdpa, method="star", keep=2) as pruner:
        encoded = pruner.adapter.encode_prompts(inputs, inputs["input_ids"], layout_of(pruner, inputs))
    assert torch.allclose(encoded.groups[0].view.received(), expected, atol=1e-6)
    with star.apply(sdpa, method="star", keep=5, stage1_ratio=0.5) as pruner:
        sdpa(**inputs)
        kept = kept_of(pruner.stats, 0)[0]
    assert torch.equal(kept, torch.cat([top_k_in_order(expected[i], 8) + i * GEMMA_TOKENS for i in range(2)]))


@torch.no_grad()
@pytest.mark.parametrize("layer", [2, 3])
def test_decoder_selection_equals_top_k_of_eager_attention(layer):
    """The eager model's own weights: query_pre_attn_scalar, q/k norms, the layer type's rotary table."""
    eager, sdpa = tiny_gemma3(attn="eager"), tiny_gemma3(attn="sdpa")
    inputs = gemma_inputs([1, 2], [(3, 6), (1, 2)], seed=7)
    probs = eager(**inputs, output_attentions=True).attentions[layer]
    with star.apply(sdpa, method="star", keep=3, layer=layer, stage1_ratio=0.0) as pruner:
        sdpa(**inputs)
        stage = kept_of(pruner.stats, 0)[1], kept_of(pruner.stats, 1)[1]
    for row, ids in enumerate(inputs["input_ids"]):
        image = (ids == IMAGE_TOKEN).nonzero()[:, 0]
        text = torch.arange(int(image[-1]) + 1, len(ids))  # from the end-of-image token on
        scores = probs[row][:, text][:, :, image].mean(dim=(0, 1))
        assert torch.equal(stage[row], top_k_in_order(scores, 3 * len(image) // GEMMA_TOKENS))  # 3 per image


def test_bad_inputs_are_named(model):
    for method in ["fastervlm", "visionzip"]:
        with pytest.raises(ValueError, match=rf"method='{method}' cannot prune Gemma3.*\[CLS\]"):
            star.apply(model, method=method, keep=3)
        assert not model._forward_pre_hooks
    with pytest.raises(ValueError, match="keep=17"):
        star.apply(model, method="star", keep=17)
    inputs = gemma_inputs([1], [(2, 2)])
    mismatch = {**inputs, "input_ids": torch.where(inputs["input_ids"] == IMAGE_TOKEN, 5, inputs["input_ids"])}
    with star.apply(model, method="star", keep=3), torch.no_grad():
        with pytest.raises(ValueError, match="image tokens"):
            model(**mismatch)


@torch.no_grad()
def test_a_decoder_stage_refuses_a_sequence_beyond_the_sliding_window():
    """Stage 1 alone runs any length (the decoder runs the shorter prompt as it is); a decoder stage refuses a
    prompt, or a generation, that outgrows the window, before it computes anything wrong."""
    narrow = tiny_gemma3(window=32)
    long = gemma_inputs([2], [(2, 2)], seed=9)  # 2 * (16 + 3) + 4 = 42 tokens
    before = narrow(**long).logits
    with star.apply(narrow, method="none", keep=1.0):
        assert (narrow(**long).logits - before).abs().max() < 1e-5
    with star.apply(narrow, method="random", keep=4):
        narrow.generate(**long, max_new_tokens=3, do_sample=False)
    with star.apply(narrow, method="star", keep=4), pytest.raises(ValueError, match="sliding_window=32"):
        narrow(**long)
    short = gemma_inputs([1], [(2, 2)], seed=9)  # 16 + 3 + 4 = 23 tokens, 14 after stage 1
    with star.apply(narrow, method="star", keep=4, stage1_ratio=0.5), pytest.raises(ValueError, match="sliding_window=32"):
        narrow.generate(**short, max_new_tokens=30, min_new_tokens=30, do_sample=False)
