"""Scores recomputed under SDPA equal those read from eager attention, and selection is exact top-k."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import star
from conftest import IMAGE_TOKEN, N_VISUAL, batch, prompt_ids, tiny_llava
from star.scoring import attention_probs, key_attention, received_attention, top_k_in_order

PROMPTS = [prompt_ids(3, 6, seed=1), prompt_ids(7, 4, seed=2), prompt_ids(1, 9, seed=3)]


@pytest.fixture(scope="module")
def eager_and_sdpa():
    return tiny_llava(attn="eager", seed=0), tiny_llava(attn="sdpa", seed=0)


@torch.no_grad()
def test_vision_scores_equal_eager_attention(eager_and_sdpa):
    eager, sdpa = eager_and_sdpa
    pixels = batch(PROMPTS)["pixel_values"]
    attentions = eager.model.vision_tower(pixels, output_attentions=True).attentions
    probs = attentions[len(attentions) - 2]  # the layer whose output is vision_feature_layer = -2
    with star.apply(sdpa, method="star", keep=4) as pruner:
        view = pruner.adapter.encode(pixels)
        assert torch.allclose(view.received(), probs.mean(dim=(1, 2))[:, 1:], atol=1e-6)
        assert torch.allclose(view.cls_attention(), probs[:, :, 0, 1:].mean(dim=1), atol=1e-6)


def _eager_decoder_scores(eager, inputs, layer: int, rows: str) -> torch.Tensor:
    """Attention to each image token from the text rows (or the last token) of one eager layer, per prompt."""
    probs = eager(**inputs, output_attentions=True).attentions[layer]
    scores = []
    for row, ids in enumerate(inputs["input_ids"]):
        image = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
        queries = torch.arange(int(image[-1]) + 1, len(ids)) if rows == "text" else torch.tensor([len(ids) - 1])
        scores.append(probs[row][:, queries][:, :, image].mean(dim=(0, 1)))
    return torch.stack(scores)


@torch.no_grad()
@pytest.mark.parametrize(
    "method, options, score_layer, rows",
    [("star", {"stage1_ratio": 0.0, "layer": 3}, 3, "text"), ("fastv", {"layer": 2}, 1, "last"), ("pdrop", {}, 1, "last")],
)
def test_decoder_selection_equals_top_k_of_eager_attention(eager_and_sdpa, method, options, score_layer, rows):
    eager, sdpa = eager_and_sdpa
    inputs = batch(PROMPTS)
    reference = _eager_decoder_scores(eager, inputs, score_layer, rows)
    with star.apply(sdpa, method=method, keep=5, **options) as pruner:
        sdpa(**inputs)
        stage = pruner.stats.kept_patches[1]
    expected_keep = pruner.plan.llm_stages[0].keep
    assert torch.equal(stage, top_k_in_order(reference, expected_keep))


@torch.no_grad()
@pytest.mark.parametrize("method", star.methods())
def test_every_method_keeps_the_same_tokens_and_logits_under_sdpa_and_eager(eager_and_sdpa, method):
    inputs = batch(PROMPTS)
    kept, logits = [], []
    for model in eager_and_sdpa:
        with star.apply(model, method=method, keep=5) as pruner:
            logits.append(model(**inputs).logits[:, -1])
            kept.append(pruner.stats.kept_patches)
    assert all(torch.equal(e, s) for e, s in zip(*kept))
    assert (logits[0] - logits[1]).abs().max() < 1e-4


@torch.no_grad()
def test_decoder_attention_rows_equal_eager_probabilities(eager_and_sdpa):
    eager, sdpa = eager_and_sdpa
    inputs = batch(PROMPTS)
    out = eager(**inputs, output_attentions=True, output_hidden_states=True)
    layer = 3
    pruner = star.apply(sdpa, method="none", keep=N_VISUAL)
    try:
        lm = sdpa.model.language_model
        positions = inputs["attention_mask"].cumsum(-1) - 1
        position_embeddings = lm.rotary_emb(out.hidden_states[layer], torch.arange(positions.shape[1])[None])
        rows = torch.tensor([[10, 20, 26]]).expand(3, 3)
        q, k = pruner.adapter.decoder_qk(lm.layers[layer], out.hidden_states[layer], position_embeddings, rows)
        probs = star.scoring.attention_probs(q, k, inputs["attention_mask"].bool(), rows)
    finally:
        pruner.remove()
    expected = out.attentions[layer].gather(2, rows[:, None, :, None].expand(-1, 4, -1, probs.shape[-1]))
    valid = inputs["attention_mask"].bool()[:, None, None, :]
    assert torch.allclose(probs * valid, expected * valid, atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=-3, max_value=3), min_size=1, max_size=40).flatmap(
        lambda xs: st.tuples(st.just(xs), st.integers(min_value=1, max_value=len(xs)))
    )
)
def test_top_k_in_order_is_the_top_set_with_lowest_index_ties(case):
    values, k = case
    kept = top_k_in_order(torch.tensor(values, dtype=torch.float), k).tolist()
    expected = sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])
    assert kept == expected


@pytest.mark.parametrize(
    "rows, block, spread",
    [(37, 10, 1.0), (37, 8 * 45, 1.0), (37, 64 * 45, 1.0), (37, 4 * 37 * 45, 1.0), (50, 7 * 45, 40.0)],
    ids=["a row per block", "spans of 8 rows", "a head per block", "4 of the 6 heads per block", "large logits"],
)
def test_key_attention_is_the_mean_of_the_softmax_over_rows_and_heads(rows, block, spread):
    """Blocked in place, as a large image is scored: the blocks' sum equals the whole matrix's mean, for spans of
    a head's rows and for groups of heads that do not divide the batch's heads, also where the logits are large
    enough that an exponential without its row's maximum would overflow, and where the tower's q needs a gradient
    (a forward outside no_grad)."""
    generator = torch.Generator().manual_seed(rows + block)
    q = (spread * torch.randn(2, 3, rows, 8, generator=generator)).requires_grad_()
    k = torch.randn(2, 3, 45, 8, generator=generator)
    expected = received_attention(attention_probs(q, k))
    got = key_attention(q, k, block)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
    assert torch.allclose(got.sum(dim=-1), torch.ones(2))
